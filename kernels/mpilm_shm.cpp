// The hot path of mpilm's shared-memory allreduce (mpilm/comm/shm.py, algorithm "shm"), in C++.
//
// One call of shm_allreduce runs the whole protocol that shm.py's _NodeGroup.run runs in Python
// for an allreduce, on the same shared memory and with the same counters, so a call may take
// either path: copy a private input into this rank's scratch half, describe the call in the
// control block, sync 1, check that every rank describes the same call, then one of
//   push      (every input lies in a shared buffer): reduce my slice from every buffer, write it
//             into mine and every peer's, sync 2;
//   one-shot  (small, every input private): sum every whole input in rank order, no more syncs;
//   pull      (otherwise): reduce my slice, publish it in scratch, sync 2, copy the peers' slices
//             out of their memory, and sync 3 when some input is a shared buffer.
// Sums run in the order shm.py uses (my slice first, then the peers in rank order; one-shot: rank
// order), in float for float16/bfloat16, and divide last, so both paths give the same bits.
//
// Synchronisation: an arrival counter per rank in the control block, stored with release and
// polled with acquire semantics between full fences (shm.py uses MPI_Win_sync for the fences).
// A waiting rank spins with a pause instruction for busy_ns, then yields the core until
// yield_ns, then sleeps sleep_ns between polls. The GIL is released for the whole call.
//
// What it does not: no MPI calls (windows are created, grown and freed by shm.py), no scratch
// growth (shm.py takes calls whose private input does not fit; a rank with a shared input that
// meets such a peer returns kShmGrow after sync 1 and shm.py finishes the call), no
// reduce_scatter/allgather halves, no hier.
#include <torch/extension.h>

#include <sched.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "mpilm_kernels.h"

namespace mpilm {
namespace {

// mirrored from mpilm/comm/shm.py
constexpr int64_t kSlotWords = 16;
constexpr int64_t kArrived = 0;
constexpr int64_t kDescriptionBase[2] = {2, 8};
constexpr int64_t kScratch = -1;
constexpr int64_t kGrowing = -2;
constexpr int64_t kBlock = 2048;  // elements summed per pass, in a stack accumulator (L1)

// context words (an int64 numpy array owned by shm.py's _NodeGroup)
enum Context : int64_t {
  kArrivals = 0, kCalls, kSlots, kMe, kRanks, kBases, kBaseRows, kScratchHalfBytes,
  kBusyNs, kYieldNs, kSleepNs, kContextWords
};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// Sync point: publish my arrival, wait for every node peer to arrive too (blocks on the peers).
void arrive_and_wait(int64_t* ctx) {
  auto* slots = reinterpret_cast<int64_t*>(ctx[kSlots]);
  const int64_t me = ctx[kMe], p = ctx[kRanks];
  std::atomic_thread_fence(std::memory_order_seq_cst);  // my stores to shared memory first
  const int64_t target = ++ctx[kArrivals];
  __atomic_store_n(&slots[me * kSlotWords + kArrived], target, __ATOMIC_RELEASE);
  for (int64_t q = 0; q < p; ++q) {
    if (q == me) continue;
    int64_t* word = &slots[q * kSlotWords + kArrived];
    if (__atomic_load_n(word, __ATOMIC_ACQUIRE) >= target) continue;
    const int64_t start = now_ns();
    for (int64_t polls = 1; __atomic_load_n(word, __ATOMIC_ACQUIRE) < target; ++polls) {
      if (polls % 64) {
        cpu_relax();
        continue;
      }
      const int64_t waited = now_ns() - start;
      if (waited < ctx[kBusyNs]) {
        cpu_relax();
      } else if (waited < ctx[kYieldNs]) {
        sched_yield();  // gives the core to a peer that shares it
      } else {
        timespec pause = {0, ctx[kSleepNs]};
        nanosleep(&pause, nullptr);
      }
    }
  }
  std::atomic_thread_fence(std::memory_order_seq_cst);  // my loads of the peers' memory after
}

template <typename T> struct Accumulator { using type = T; };
template <> struct Accumulator<c10::Half> { using type = float; };
template <> struct Accumulator<c10::BFloat16> { using type = float; };

// out[0:m] = (parts[0] + parts[1] + ...) / divisor (out may be parts[0]); copies of the result
// go to every publish destination while the block is in cache.
template <typename T>
void reduce(T* out, const std::vector<const T*>& parts, int64_t m, int64_t divisor,
            const std::vector<T*>& publish) {
  using A = typename Accumulator<T>::type;
  alignas(64) A acc[kBlock];
  const A d = static_cast<A>(divisor);
  for (int64_t start = 0; start < m; start += kBlock) {
    const int64_t len = std::min(kBlock, m - start);
    const T* first = parts[0] + start;
    for (int64_t i = 0; i < len; ++i) acc[i] = static_cast<A>(first[i]);
    for (size_t k = 1; k < parts.size(); ++k) {
      const T* part = parts[k] + start;
      for (int64_t i = 0; i < len; ++i) acc[i] += static_cast<A>(part[i]);
    }
    if (divisor > 1)
      for (int64_t i = 0; i < len; ++i) acc[i] /= d;
    T* dst = out + start;
    for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<T>(acc[i]);
    for (T* destination : publish) std::memcpy(destination + start, dst, len * sizeof(T));
  }
}

template <typename T>
int64_t run(T* buf, int64_t n, int64_t divisor, int64_t signature, int64_t my_window, int64_t my_offset,
            int64_t oneshot_bytes, int64_t* ctx) {
  auto* slots = reinterpret_cast<int64_t*>(ctx[kSlots]);
  const auto* bases = reinterpret_cast<const int64_t*>(ctx[kBases]);
  const int64_t me = ctx[kMe], p = ctx[kRanks], rows = ctx[kBaseRows];
  const int64_t esize = sizeof(T);
  const int64_t half_elements = ctx[kScratchHalfBytes] / esize;
  const int64_t parity = ++ctx[kCalls] & 1;
  const bool small = n * esize * (p - 1) <= oneshot_bytes;
  auto lo_of = [&](int64_t q) { return q * n / p; };
  const int64_t lo = lo_of(me), hi = lo_of(me + 1);

  if (my_window == kScratch) {  // private input: copy what the peers read into my scratch half
    my_offset = parity * half_elements;
    T* target = reinterpret_cast<T*>(bases[me]) + my_offset;
    if (small) {
      std::memcpy(target, buf, n * esize);
    } else {
      std::memcpy(target, buf, lo * esize);
      std::memcpy(target + hi, buf + hi, (n - hi) * esize);
    }
  }
  const int64_t description = me * kSlotWords + kDescriptionBase[parity];
  slots[description + 0] = my_window;
  slots[description + 1] = my_offset;
  slots[description + 2] = signature;
  arrive_and_wait(ctx);  // sync 1: every input in shared memory, its place published

  std::vector<T*> input(p);
  bool all_shared = true, all_private = true;
  for (int64_t q = 0; q < p; ++q)  // every rank sees the same descriptions: all take the same exit
    if (slots[q * kSlotWords + kDescriptionBase[parity] + 2] != signature) return kShmMismatch;
  for (int64_t q = 0; q < p; ++q) {
    const int64_t* d = &slots[q * kSlotWords + kDescriptionBase[parity]];
    if (d[0] == kGrowing) return kShmGrow;  // a private peer's scratch is too small: shm.py goes on
    const int64_t row = d[0] + 1;  // row 0: scratch, row w + 1: shared buffer w
    if (row < 0 || row >= rows || bases[row * p + q] == 0) return kShmUnknownWindow;
    input[q] = reinterpret_cast<T*>(bases[row * p + q]) + d[1];
    all_shared = all_shared && d[0] != kScratch;
    all_private = all_private && d[0] == kScratch;
  }

  if (small && all_private) {  // one-shot: every rank sums every input in rank order
    std::vector<const T*> parts(input.begin(), input.end());
    reduce<T>(buf, parts, n, divisor, {});
    return kShmDone;  // the scratch halves stay put until the peers pass sync 1 of their next call
  }
  std::vector<const T*> parts = {buf + lo};
  std::vector<T*> publish;
  for (int64_t q = 0; q < p; ++q) {
    if (q == me) continue;
    parts.push_back(input[q] + lo);
    if (all_shared) publish.push_back(input[q] + lo);  // push into the peers' buffers
  }
  if (!all_shared && my_window == kScratch) publish.push_back(input[me] + lo);  // pull: for the peers
  if (hi > lo) reduce<T>(buf + lo, parts, hi - lo, divisor, publish);
  arrive_and_wait(ctx);  // sync 2: reduced slices ready (pushed or published), inputs all read
  if (all_shared) return kShmDone;
  for (int64_t q = 0; q < p; ++q) {
    if (q == me) continue;
    const int64_t q_lo = lo_of(q), q_hi = lo_of(q + 1);
    std::memcpy(buf + q_lo, input[q] + q_lo, (q_hi - q_lo) * esize);
  }
  if (!all_private) arrive_and_wait(ctx);  // sync 3: shared buffers free again for their owners
  return kShmDone;
}

}  // namespace

int64_t shm_allreduce(int64_t buf_address, int64_t n, int64_t dtype_code, int64_t divisor, int64_t signature,
                      int64_t my_window, int64_t my_offset, int64_t oneshot_bytes, int64_t context_address) {
  auto* ctx = reinterpret_cast<int64_t*>(context_address);
  void* buf = reinterpret_cast<void*>(buf_address);
  switch (dtype_code) {  // shm.py's _DTYPE_CODES
    case 1: return run(static_cast<float*>(buf), n, divisor, signature, my_window, my_offset, oneshot_bytes, ctx);
    case 2: return run(static_cast<double*>(buf), n, divisor, signature, my_window, my_offset, oneshot_bytes, ctx);
    case 3: return run(static_cast<c10::Half*>(buf), n, divisor, signature, my_window, my_offset, oneshot_bytes, ctx);
    case 4: return run(static_cast<c10::BFloat16*>(buf), n, divisor, signature, my_window, my_offset, oneshot_bytes, ctx);
    default: return kShmBadDtype;  // checked before anything was published: nobody waits
  }
}

int64_t shm_context_words() { return kContextWords; }

}  // namespace mpilm
