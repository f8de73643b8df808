// Shared definitions of mpilm's gradient-compression kernels (C++ and CUDA).
//
// The selection rule every implementation follows (the C++ kernel, the CUDA kernel and the torch
// fallback in mpilm/kernels.py), so that all of them return the same pairs bit for bit:
//   - the magnitude key of a float32 value is its bit pattern with the sign bit cleared, read as
//     a non-negative int32. Ordering by key is ordering by |x| for finite values; +-inf sort above
//     every finite value and NaN above inf, so a diverged gradient is sent (and seen by every
//     rank) instead of hiding in a residual; -0.0 and +0.0 have the same key.
//   - top-k = the k entries of largest key, ties broken by the lowest index; the pairs come out
//     in increasing index order.
// The threshold estimated from a strided sample (DGC's trick) only decides how much work it takes
// to find that set, never which set is returned. The sampling plan below is mirrored in
// mpilm/kernels.py (_sample_plan) so the torch fallback does the same amount of work.
//
// Limits: float32 only; n < 2^31 (indices travel as int32).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace mpilm {

constexpr uint32_t kMagnitudeMask = 0x7fffffffu;

// expected number of sample entries at or above the true k-th key: the sample size follows
// from it, and 256 hits put the threshold within a few percent of the true one
constexpr double kSampleHitsPerK = 256.0;
constexpr int64_t kMinSample = 1024;

inline int32_t magnitude_key(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return static_cast<int32_t>(bits & kMagnitudeMask);
}

struct SamplePlan {
  int64_t size;       // number of sampled entries
  int64_t stride;     // sample j is element offset + j * stride
  int64_t offset;
  int64_t rank_near;  // 1-based rank (from the largest) of the first threshold tried
  int64_t rank_far;   // a lower threshold, tried when the first one yields fewer than k entries
};

// Sampling plan for selecting k of n (0 < k < n).
inline SamplePlan sample_plan(int64_t n, int64_t k) {
  SamplePlan plan;
  const double want = std::ceil(kSampleHitsPerK * static_cast<double>(n) / static_cast<double>(k));
  plan.size = want >= static_cast<double>(n) ? n : std::min(n, std::max(static_cast<int64_t>(want), kMinSample));
  plan.stride = n / plan.size;
  plan.offset = plan.stride / 2;
  const double expected = static_cast<double>(plan.size) * static_cast<double>(k) / static_cast<double>(n);
  // three standard deviations of a binomial count above the expectation: the first scan
  // yields at least k candidates with probability ~0.999
  plan.rank_near = std::min(plan.size, static_cast<int64_t>(std::ceil(expected + 3.0 * std::sqrt(expected))) + 1);
  plan.rank_far = std::min(plan.size, 8 * plan.rank_near);
  return plan;
}

// The thresholds tried in turn (the last is always 0, which admits every entry). A sampled
// threshold of 0 is raised to 1 first: buckets with many exact zeros (unused embedding rows)
// then scan their non-zero entries before falling back to everything.
struct ThresholdAttempts {
  int32_t values[3];
  int count;
};

inline ThresholdAttempts threshold_attempts(int32_t near_key, int32_t far_key) {
  ThresholdAttempts attempts{{0, 0, 0}, 0};
  const int32_t near_t = std::max<int32_t>(near_key, 1);
  const int32_t far_t = std::max<int32_t>(far_key, 1);
  attempts.values[attempts.count++] = near_t;
  if (far_t < near_t) attempts.values[attempts.count++] = far_t;
  attempts.values[attempts.count++] = 0;
  return attempts;
}

// ---------------------------------------------------------------- shared-memory allreduce
// (mpilm_shm.cpp; the Python side is mpilm/comm/shm.py). Return codes, mirrored there:
constexpr int64_t kShmDone = 0;           // the allreduce is complete on this rank
constexpr int64_t kShmMismatch = 1;       // the ranks of the node described different calls
constexpr int64_t kShmUnknownWindow = 2;  // a rank named a window this rank does not know
constexpr int64_t kShmBadDtype = 3;       // nothing was done
constexpr int64_t kShmGrow = 4;           // past sync 1, a peer must grow the scratch: Python goes on
int64_t shm_allreduce(int64_t buf_address, int64_t n, int64_t dtype_code, int64_t divisor, int64_t signature,
                      int64_t my_window, int64_t my_offset, int64_t oneshot_bytes, int64_t context_address);
int64_t shm_context_words();

}  // namespace mpilm
