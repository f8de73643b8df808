// mpilm's gradient-compression kernels: CPU implementations and the Python bindings.
//
// What it does (float32 buffers, int32 indices; the selection rule is in mpilm_kernels.h):
//   topk(x, k, out_idx, out_val)                   exact top-k of x by magnitude, found through a
//                                                  sampled threshold (DGC's trick), index order
//   residual_topk(grad, residual, k, out_idx, out_val)
//                                                  fused error feedback: residual += grad in the
//                                                  first scan, select top-k of the sum, then zero
//                                                  the selected entries of residual
//   sparse_accumulate(dense, idx, val)             dense[idx[j]] += val[j] for j in array order
//                                                  (duplicates summed in that order, so the result
//                                                  is bit-identical to a sequential loop and to
//                                                  torch's CPU index_add_)
// CUDA tensors go to mpilm_kernels.cu when the module was built with it (MPILM_WITH_CUDA).
// Threads: ATen's intra-op pool (torch.set_num_threads); results never depend on the count.
// The scan compares 32 keys per step (SSE2 on x86-64, a vectorisable loop elsewhere) and keeps
// each candidate's index and bits, so the final selection works on ~1.2k entries, not on x.
//
// What it does not: no allocation of outputs (callers pass them, so a compressor reuses its
// buffers), no dtypes other than float32, no reductions across ranks.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <functional>
#include <numeric>
#include <vector>

#include "mpilm_kernels.h"

namespace mpilm {

#ifdef MPILM_WITH_CUDA
void topk_cuda(at::Tensor x, const at::Tensor& grad, int64_t k, at::Tensor out_idx, at::Tensor out_val);
void sparse_accumulate_cuda(at::Tensor dense, const at::Tensor& idx, const at::Tensor& val);
#endif

namespace {

// elements whose keys are compared at once (one bit each in a 32-bit mask); at 1% density most
// blocks hold no candidate and cost only the vector compares
constexpr int64_t kBlock = 32;
// smallest stretch of the input given to one parallel task
constexpr int64_t kMinChunk = int64_t(1) << 16;

inline int32_t float_bits(float v) {
  int32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
}

inline float bits_float(int32_t bits) {
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// Bit j of the result is key(xb[j]) >= t (t >= 1), for the kBlock elements at xb; when kFused,
// xb[j] += gb[j] first (the residual update, stored). SSE2 (every x86-64) compares 4 keys per
// instruction and gathers the verdicts with movemask; elsewhere a loop the compiler vectorises.
template <bool kFused>
inline uint32_t block_mask(float* xb, const float* gb, int32_t t) {
  static_assert(kBlock == 32, "one bit per element of a uint32_t");
#if defined(__SSE2__)
  const __m128i magnitude = _mm_set1_epi32(static_cast<int32_t>(kMagnitudeMask));
  const __m128i below = _mm_set1_epi32(t - 1);  // key >= t  <=>  key > t - 1 (keys are >= 0)
  uint32_t mask = 0;
  for (int q = 0; q < 8; ++q) {
    __m128 v = _mm_loadu_ps(xb + 4 * q);
    if (kFused) {
      v = _mm_add_ps(v, _mm_loadu_ps(gb + 4 * q));
      _mm_storeu_ps(xb + 4 * q, v);
    }
    const __m128i keys = _mm_and_si128(_mm_castps_si128(v), magnitude);
    mask |= static_cast<uint32_t>(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(keys, below)))) << (4 * q);
  }
  return mask;
#else
  if (kFused) {
    for (int64_t j = 0; j < kBlock; ++j) xb[j] += gb[j];
  }
  uint32_t mask = 0;
  for (int64_t j = 0; j < kBlock; ++j) mask |= static_cast<uint32_t>(magnitude_key(xb[j]) >= t) << j;
  return mask;
#endif
}

// Candidates of one stretch of the input: indices in increasing order and the raw bits of their
// values (key = bits without the sign), so that the selection never reads x again.
struct Candidates {
  std::vector<int32_t> idx, bits;
  size_t used = 0;

  void make_room(size_t extra) {
    if (used + extra > idx.size()) {
      const size_t want = std::max(2 * idx.size(), used + extra);
      idx.resize(want);
      bits.resize(want);
    }
  }
  void push(int64_t i, float v) {
    make_room(1);
    idx[used] = static_cast<int32_t>(i);
    bits[used++] = float_bits(v);
  }
  // the elements of the block at `base` whose bit is set in `mask` (non-zero)
  void push_block(const float* xb, int64_t base, uint32_t mask) {
    make_room(kBlock);
    do {
      const int j = __builtin_ctz(mask);
      idx[used] = static_cast<int32_t>(base + j);
      bits[used++] = float_bits(xb[j]);
      mask &= mask - 1;
    } while (mask != 0);
  }
};

// Collects the elements i in [lo, hi) with key(x[i]) >= t (t >= 1), in increasing order. When
// kFused, first sets x[i] += grad[i] (x is the residual; done on the first scan only).
template <bool kFused>
void scan_range(float* x, const float* grad, int64_t lo, int64_t hi, int32_t t, Candidates& out) {
  int64_t i = lo;
  for (; i + kBlock <= hi; i += kBlock) {
    const uint32_t mask = block_mask<kFused>(x + i, kFused ? grad + i : nullptr, t);
    if (mask != 0) out.push_block(x + i, i, mask);
  }
  for (; i < hi; ++i) {
    if (kFused) x[i] += grad[i];
    if (magnitude_key(x[i]) >= t) out.push(i, x[i]);
  }
}

// All elements with key >= t, in increasing index order; chunks are scanned in parallel and
// joined in chunk order, so the result does not depend on the thread count.
Candidates collect_candidates(float* x, const float* grad, int64_t n, int32_t t, int64_t expected) {
  Candidates all;
  if (t == 0) {  // every entry qualifies; the fused add has happened on an earlier scan
    all.idx.resize(static_cast<size_t>(n));
    std::iota(all.idx.begin(), all.idx.end(), 0);
    all.bits.assign(reinterpret_cast<const int32_t*>(x), reinterpret_cast<const int32_t*>(x) + n);
    all.used = static_cast<size_t>(n);
    return all;
  }
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(n / kMinChunk, 8 * threads));
  std::vector<Candidates> found(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t lo = n * c / chunks, hi = n * (c + 1) / chunks;
      Candidates& out = found[static_cast<size_t>(c)];
      out.make_room(static_cast<size_t>(expected / chunks + 2 * kBlock));
      if (grad != nullptr)
        scan_range<true>(x, grad, lo, hi, t, out);
      else
        scan_range<false>(x, nullptr, lo, hi, t, out);
    }
  });
  if (chunks == 1) return std::move(found[0]);
  size_t total = 0;
  for (const auto& f : found) total += f.used;
  all.idx.resize(total);
  all.bits.resize(total);
  for (const auto& f : found) {
    std::copy(f.idx.begin(), f.idx.begin() + f.used, all.idx.begin() + all.used);
    std::copy(f.bits.begin(), f.bits.begin() + f.used, all.bits.begin() + all.used);
    all.used += f.used;
  }
  return all;
}

// From m >= k candidates, write the k of largest key (lowest index first among equal keys) to
// out_idx / out_val in increasing index order; zero those entries of x when fused.
void finish_selection(float* x, bool fused, const Candidates& cand, int64_t k, int32_t* out_idx, float* out_val) {
  const int64_t m = static_cast<int64_t>(cand.used);
  if (m == k) {
    std::copy(cand.idx.begin(), cand.idx.begin() + k, out_idx);
    for (int64_t j = 0; j < k; ++j) out_val[j] = bits_float(cand.bits[j]);
  } else {
    std::vector<int32_t> keys(static_cast<size_t>(m));
    for (int64_t j = 0; j < m; ++j) keys[j] = static_cast<int32_t>(cand.bits[j] & kMagnitudeMask);
    std::vector<int32_t> scratch(keys);
    std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<int32_t>());
    const int32_t boundary = scratch[k - 1];  // the k-th largest key
    int64_t above = 0;
    for (int64_t j = 0; j < m; ++j) above += keys[j] > boundary;
    int64_t ties_wanted = k - above;  // entries with key == boundary to take, lowest index first
    int64_t w = 0;
    for (int64_t j = 0; j < m && w < k; ++j) {
      if (keys[j] > boundary || (keys[j] == boundary && ties_wanted-- > 0)) {
        out_idx[w] = cand.idx[j];
        out_val[w++] = bits_float(cand.bits[j]);
      }
    }
  }
  if (fused) {
    for (int64_t j = 0; j < k; ++j) x[out_idx[j]] = 0.0f;
  }
}

void check_pairs(const at::Tensor& ref, int64_t k, const at::Tensor& out_idx, const at::Tensor& out_val) {
  TORCH_CHECK(out_idx.scalar_type() == at::kInt && out_idx.is_contiguous() && out_idx.numel() == k,
              "out_idx must be a contiguous int32 tensor of k elements");
  TORCH_CHECK(out_val.scalar_type() == at::kFloat && out_val.is_contiguous() && out_val.numel() == k,
              "out_val must be a contiguous float32 tensor of k elements");
  TORCH_CHECK(out_idx.device() == ref.device() && out_val.device() == ref.device(),
              "outputs must be on the input's device");
}

void check_dense(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 1,
              name, " must be a contiguous 1-D float32 tensor");
  TORCH_CHECK(t.numel() < (int64_t(1) << 31), name, " has 2^31 or more elements (indices are int32)");
}

// x: the values (the residual when grad is given); grad: undefined for plain top-k.
void topk_cpu(at::Tensor x, const at::Tensor& grad, int64_t k, at::Tensor out_idx, at::Tensor out_val) {
  const int64_t n = x.numel();
  float* xp = x.data_ptr<float>();
  const float* gp = grad.defined() ? grad.data_ptr<float>() : nullptr;
  int32_t* ip = out_idx.data_ptr<int32_t>();
  float* vp = out_val.data_ptr<float>();
  if (k == 0 || k == n) {
    if (gp != nullptr) x.add_(grad);
    for (int64_t j = 0; j < k; ++j) ip[j] = static_cast<int32_t>(j);
    if (k == n) {
      std::copy(xp, xp + n, vp);
      if (gp != nullptr) x.zero_();
    }
    return;
  }
  const SamplePlan plan = sample_plan(n, k);
  std::vector<int32_t> sample(static_cast<size_t>(plan.size));
  for (int64_t j = 0; j < plan.size; ++j) {
    const int64_t i = plan.offset + j * plan.stride;
    sample[j] = magnitude_key(gp != nullptr ? xp[i] + gp[i] : xp[i]);  // the same fp32 sum the scan stores
  }
  auto far_it = sample.begin() + (plan.rank_far - 1);
  std::nth_element(sample.begin(), far_it, sample.end(), std::greater<int32_t>());
  const int32_t far_key = *far_it;
  auto near_it = sample.begin() + (plan.rank_near - 1);
  std::nth_element(sample.begin(), near_it, far_it, std::greater<int32_t>());
  const int32_t near_key = plan.rank_near == plan.rank_far ? far_key : *near_it;
  const ThresholdAttempts attempts = threshold_attempts(near_key, far_key);

  Candidates cand;
  for (int a = 0; a < attempts.count; ++a) {
    // the residual update happens on the first scan only; later scans read the updated x
    cand = collect_candidates(xp, a == 0 ? gp : nullptr, n, attempts.values[a], k + k / 4);
    if (static_cast<int64_t>(cand.used) >= k) break;
  }
  finish_selection(xp, gp != nullptr, cand, k, ip, vp);
}

void sparse_accumulate_cpu(at::Tensor dense, const at::Tensor& idx, const at::Tensor& val) {
  const int64_t n = dense.numel(), m = idx.numel();
  if (m == 0) return;
  float* d = dense.data_ptr<float>();
  const int32_t* ip = idx.data_ptr<int32_t>();
  const float* vp = val.data_ptr<float>();
  int32_t lowest = ip[0], highest = ip[0];
  for (int64_t j = 0; j < m; ++j) {
    lowest = std::min(lowest, ip[j]);
    highest = std::max(highest, ip[j]);
  }
  TORCH_CHECK_INDEX(lowest >= 0 && highest < n, "sparse_accumulate: index out of range [0, ", n, "): ",
                    lowest < 0 ? lowest : highest);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  if (threads == 1 || m < kMinChunk) {
    for (int64_t j = 0; j < m; ++j) d[ip[j]] += vp[j];
    return;
  }
  // Each task owns a contiguous range of the dense buffer and applies, in array order, the
  // pairs that fall into it: every element sees its additions in the sequential order.
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const uint32_t lo = static_cast<uint32_t>(n * part / threads);
      const uint32_t width = static_cast<uint32_t>(n * (part + 1) / threads) - lo;
      for (int64_t j = 0; j < m; ++j) {
        const uint32_t i = static_cast<uint32_t>(ip[j]);
        if (i - lo < width) d[i] += vp[j];
      }
    }
  });
}

}  // namespace

void topk(const at::Tensor& x, int64_t k, at::Tensor out_idx, at::Tensor out_val) {
  check_dense(x, "x");
  TORCH_CHECK(k >= 0 && k <= x.numel(), "k = ", k, " outside [0, ", x.numel(), "]");
  check_pairs(x, k, out_idx, out_val);
#ifdef MPILM_WITH_CUDA
  if (x.is_cuda()) return topk_cuda(x, at::Tensor(), k, out_idx, out_val);
#endif
  TORCH_CHECK(x.is_cpu(), "this build of mpilm's kernels has no CUDA support");
  topk_cpu(x, at::Tensor(), k, out_idx, out_val);  // x is only read when no grad is given
}

void residual_topk(const at::Tensor& grad, at::Tensor residual, int64_t k, at::Tensor out_idx, at::Tensor out_val) {
  check_dense(grad, "grad");
  check_dense(residual, "residual");
  TORCH_CHECK(grad.numel() == residual.numel() && grad.device() == residual.device(),
              "grad and residual must have the same size and device");
  TORCH_CHECK(k >= 0 && k <= grad.numel(), "k = ", k, " outside [0, ", grad.numel(), "]");
  check_pairs(grad, k, out_idx, out_val);
#ifdef MPILM_WITH_CUDA
  if (grad.is_cuda()) return topk_cuda(residual, grad, k, out_idx, out_val);
#endif
  TORCH_CHECK(grad.is_cpu(), "this build of mpilm's kernels has no CUDA support");
  topk_cpu(residual, grad, k, out_idx, out_val);
}

void sparse_accumulate(at::Tensor dense, const at::Tensor& idx, const at::Tensor& val) {
  check_dense(dense, "dense");
  TORCH_CHECK(idx.scalar_type() == at::kInt && idx.is_contiguous() && idx.dim() == 1,
              "idx must be a contiguous 1-D int32 tensor");
  TORCH_CHECK(val.scalar_type() == at::kFloat && val.is_contiguous() && val.numel() == idx.numel(),
              "val must be a contiguous float32 tensor as long as idx");
  TORCH_CHECK(idx.device() == dense.device() && val.device() == dense.device(),
              "dense, idx and val must be on one device");
#ifdef MPILM_WITH_CUDA
  if (dense.is_cuda()) return sparse_accumulate_cuda(dense, idx, val);
#endif
  TORCH_CHECK(dense.is_cpu(), "this build of mpilm's kernels has no CUDA support");
  sparse_accumulate_cpu(dense, idx, val);
}

bool with_cuda() {
#ifdef MPILM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace mpilm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mpilm kernels: top-k by sampled threshold, fused residual, sparse accumulate; shared-memory allreduce";
  // the GIL is released: grad sync may call these from its communication thread
  m.def("topk", &mpilm::topk, "exact top-k by magnitude into (out_idx, out_val), index order",
        py::arg("x"), py::arg("k"), py::arg("out_idx"), py::arg("out_val"),
        py::call_guard<py::gil_scoped_release>());
  m.def("residual_topk", &mpilm::residual_topk,
        "residual += grad; top-k of residual into (out_idx, out_val); zero those entries of residual",
        py::arg("grad"), py::arg("residual"), py::arg("k"), py::arg("out_idx"), py::arg("out_val"),
        py::call_guard<py::gil_scoped_release>());
  m.def("sparse_accumulate", &mpilm::sparse_accumulate, "dense[idx[j]] += val[j] in array order",
        py::arg("dense"), py::arg("idx"), py::arg("val"), py::call_guard<py::gil_scoped_release>());
  m.def("with_cuda", &mpilm::with_cuda, "whether the CUDA kernels were compiled in");
  // mpilm_shm.cpp: raw addresses from mpilm/comm/shm.py, which owns the memory behind them
  m.def("shm_allreduce", &mpilm::shm_allreduce,
        "shared-memory allreduce of one buffer on one node (the whole protocol of shm.py)",
        py::arg("buf_address"), py::arg("n"), py::arg("dtype_code"), py::arg("divisor"), py::arg("signature"),
        py::arg("my_window"), py::arg("my_offset"), py::arg("oneshot_bytes"), py::arg("context_address"),
        py::call_guard<py::gil_scoped_release>());
  m.def("shm_context_words", &mpilm::shm_context_words, "length of the int64 context shm_allreduce reads");
}
