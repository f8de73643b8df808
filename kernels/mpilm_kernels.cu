// mpilm's gradient-compression kernels on CUDA (compiled only when torch sees a GPU).
//
// Same contracts and bits as the CPU code in mpilm_kernels.cpp (selection rule in
// mpilm_kernels.h):
//   topk_cuda(x, grad, k, out_idx, out_val)   grad undefined: top-k of x; grad defined: x is the
//                                             residual, x += grad in the first scan, the selected
//                                             entries of x are zeroed afterwards
//   sparse_accumulate_cuda(dense, idx, val)   dense[idx[j]] += val[j] in array order
// How: the strided sample gives thresholds (sorted on the device, two numbers read back); one
// kernel counts the entries at or above the threshold per tile (and does the fused residual add
// on the first scan); an exclusive scan of the tile counts gives each tile its output offset and
// a second kernel writes the candidate indices in increasing order (warp ballots, no atomics).
// The exact top-k among the ~1.2k candidates uses ATen ops on the device (kthvalue, cumsum).
// Accumulation sorts the pairs stably by index and lets one thread add each run of equal
// indices in array order, so duplicates are summed exactly as the sequential CPU loop does.
//
// Host syncs: reading the two sampled thresholds, each scan's total count, and the selection's
// size check; all on the current stream.
//
// Limits: float32, int32 indices, n < 2^31 (checked by the callers in mpilm_kernels.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "mpilm_kernels.h"

namespace mpilm {
namespace {

constexpr int kThreads = 256;
constexpr int kItemsPerThread = 16;
constexpr int64_t kTile = static_cast<int64_t>(kThreads) * kItemsPerThread;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ int32_t device_key(float v) { return __float_as_int(v) & 0x7fffffff; }

__global__ void sample_keys_kernel(const float* x, const float* grad, int64_t offset, int64_t stride,
                                   int64_t size, int32_t* keys) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= size) return;
  const int64_t i = offset + j * stride;
  keys[j] = device_key(grad != nullptr ? x[i] + grad[i] : x[i]);  // the fp32 sum the scan stores
}

// Per tile: number of entries with key >= t; with grad, first x += grad (first scan only).
__global__ void count_kernel(float* x, const float* grad, int64_t n, int32_t t, int32_t* tile_counts) {
  const int64_t base = blockIdx.x * kTile;
  int count = 0;
  for (int q = 0; q < kItemsPerThread; ++q) {
    const int64_t i = base + static_cast<int64_t>(q) * kThreads + threadIdx.x;  // coalesced
    if (i < n) {
      float v = x[i];
      if (grad != nullptr) {
        v += grad[i];
        x[i] = v;
      }
      count += device_key(v) >= t;
    }
  }
  __shared__ int warp_sums[kWarps];
  for (int delta = 16; delta > 0; delta >>= 1) count += __shfl_down_sync(0xffffffffu, count, delta);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = count;
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
    tile_counts[blockIdx.x] = total;
  }
}

// Writes the indices with key >= t in increasing order: tile offsets from the scan, then within a
// tile rounds of kThreads consecutive elements, ordered by warp ballots.
__global__ void compact_kernel(const float* x, int64_t n, int32_t t, const int64_t* tile_ends,
                               const int32_t* tile_counts, int32_t* out) {
  __shared__ int warp_totals[kWarps];
  const int64_t base = blockIdx.x * kTile;
  int64_t write = tile_ends[blockIdx.x] - tile_counts[blockIdx.x];  // exclusive offset
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int q = 0; q < kItemsPerThread; ++q) {
    const int64_t i = base + static_cast<int64_t>(q) * kThreads + threadIdx.x;
    const bool hit = i < n && device_key(x[i]) >= t;
    const unsigned ballot = __ballot_sync(0xffffffffu, hit);
    if (lane == 0) warp_totals[warp] = __popc(ballot);
    __syncthreads();
    int before = __popc(ballot & ((1u << lane) - 1u)), round_total = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) before += warp_totals[w];
      round_total += warp_totals[w];
    }
    if (hit) out[write + before] = static_cast<int32_t>(i);
    write += round_total;
    __syncthreads();  // warp_totals is rewritten by the next round
  }
}

// One thread per run of equal (stably sorted) indices adds the run's values in array order.
__global__ void accumulate_runs_kernel(float* dense, const int32_t* sorted_idx, const int64_t* order,
                                       const float* val, int64_t m) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= m || (j > 0 && sorted_idx[j] == sorted_idx[j - 1])) return;
  const int32_t i = sorted_idx[j];
  float sum = dense[i];
  for (int64_t q = j; q < m && sorted_idx[q] == i; ++q) sum += val[order[q]];
  dense[i] = sum;
}

int blocks_for(int64_t items, int64_t per_block) { return static_cast<int>((items + per_block - 1) / per_block); }

}  // namespace

void topk_cuda(at::Tensor x, const at::Tensor& grad, int64_t k, at::Tensor out_idx, at::Tensor out_val) {
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = x.numel();
  const bool fused = grad.defined();
  if (k == 0 || k == n) {
    if (fused) x.add_(grad);
    if (k == n) {
      out_idx.copy_(at::arange(n, x.options().dtype(at::kInt)));
      out_val.copy_(x);
      if (fused) x.zero_();
    }
    return;
  }
  float* xp = x.data_ptr<float>();
  const float* gp = fused ? grad.data_ptr<float>() : nullptr;

  const SamplePlan plan = sample_plan(n, k);
  at::Tensor sample = at::empty({plan.size}, x.options().dtype(at::kInt));
  sample_keys_kernel<<<blocks_for(plan.size, kThreads), kThreads, 0, stream>>>(
      xp, gp, plan.offset, plan.stride, plan.size, sample.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor ranked = std::get<0>(sample.sort(/*dim=*/0, /*descending=*/true));
  // host sync: the two thresholds decide the scans below
  const at::Tensor picks = ranked.index_select(
      0, at::tensor({plan.rank_near - 1, plan.rank_far - 1}, x.options().dtype(at::kLong))).cpu();
  const ThresholdAttempts attempts = threshold_attempts(picks[0].item<int32_t>(), picks[1].item<int32_t>());

  const int tiles = blocks_for(n, kTile);
  at::Tensor tile_counts = at::empty({tiles}, x.options().dtype(at::kInt));
  at::Tensor tile_ends;
  int64_t m = 0;
  int32_t t = 0;
  for (int a = 0; a < attempts.count; ++a) {
    t = attempts.values[a];
    count_kernel<<<tiles, kThreads, 0, stream>>>(xp, a == 0 ? gp : nullptr, n, t, tile_counts.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    tile_ends = tile_counts.cumsum(0, at::kLong);
    m = tile_ends[tiles - 1].item<int64_t>();  // host sync: the candidate count
    if (m >= k) break;
  }
  at::Tensor cand = at::empty({m}, x.options().dtype(at::kInt));
  compact_kernel<<<tiles, kThreads, 0, stream>>>(xp, n, t, tile_ends.data_ptr<int64_t>(),
                                                  tile_counts.data_ptr<int32_t>(), cand.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor selected = cand;
  if (m > k) {
    const at::Tensor keys = x.index_select(0, cand).view(at::kInt).bitwise_and(static_cast<int64_t>(kMagnitudeMask));
    const at::Tensor boundary = std::get<0>(keys.kthvalue(m - k + 1));  // the k-th largest key
    const at::Tensor above = keys.gt(boundary);
    const at::Tensor ties = keys.eq(boundary);
    const at::Tensor ties_wanted = k - above.sum();
    selected = cand.masked_select(above.logical_or(ties.logical_and(ties.cumsum(0).le(ties_wanted))));
  }
  TORCH_CHECK(selected.numel() == k, "topk_cuda: selected ", selected.numel(), " entries, expected ", k);
  out_idx.copy_(selected);
  out_val.copy_(x.index_select(0, selected));
  if (fused) x.index_fill_(0, selected.to(at::kLong), 0.0);
}

void sparse_accumulate_cuda(at::Tensor dense, const at::Tensor& idx, const at::Tensor& val) {
  const c10::cuda::CUDAGuard guard(dense.device());
  const int64_t m = idx.numel();
  if (m == 0) return;
  const auto bounds = idx.aminmax();
  const int64_t lowest = std::get<0>(bounds).item<int64_t>(), highest = std::get<1>(bounds).item<int64_t>();  // host sync
  TORCH_CHECK_INDEX(lowest >= 0 && highest < dense.numel(), "sparse_accumulate: index out of range [0, ",
                    dense.numel(), "): ", lowest < 0 ? lowest : highest);
  const auto sorted = idx.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted_idx = std::get<0>(sorted).contiguous();
  const at::Tensor order = std::get<1>(sorted).contiguous();
  accumulate_runs_kernel<<<blocks_for(m, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      dense.data_ptr<float>(), sorted_idx.data_ptr<int32_t>(), order.data_ptr<int64_t>(), val.data_ptr<float>(), m);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mpilm
