// PhaseRunner: one OpenMP parallel region that runs a whole sequence of parallel loops
// ("phases") with serial code in between, driven by thread 0.
//
// Why not one `omp parallel for` per loop: libgomp's idle workers stop spinning after a short
// while (the spin count is cut when torch's pools make the process look oversubscribed) and sleep
// on a futex; waking them costs ~30 us per region on this 2-core VM (measured 2026-11-28: a
// 1 MB ternary GEMV 110 us per call with the default wait policy, 80 us with
// OMP_WAIT_POLICY=active, 68 us back to back in C++). A decode step has ~90 such loops.
// Here the workers spin (with pause) between phases instead, and only for the length of one step.
//
// Nobody waits for a thread that is not there: the driver publishes a phase, claims items itself,
// and waits only for the items to be *finished* (by whoever claimed them); a worker that was
// descheduled simply finds the phase over when it comes back (each claim is a compare-and-swap
// on (phase number, next item), so a stale phase can never be claimed). The one wait for every
// thread is the region's end.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BITENGINE_PAUSE() _mm_pause()
#else
#define BITENGINE_PAUSE() ((void)0)
#endif

namespace bitengine_cpu {

class PhaseRunner {
 public:
  // Driver (thread 0) only: run fn(i) for i in [0, n) on every thread of the region; returns when
  // all n are done.
  void parallel(int64_t n, const std::function<void(int64_t)>& fn) {
    if (n <= 0) return;
    const uint64_t seq = ++seq_;
    Slot& s = slots_[seq % kSlots];
    s.n.store(n);
    s.fn.store(&fn);
    s.done.store(0);
    ticket_.store(seq << 32);  // publishes the slot (seq_cst)
    work(seq, s);
    while (s.done.load() < n) BITENGINE_PAUSE();
  }

  // Driver only: let the workers leave (call once, after the last phase).
  void finish() {
    const uint64_t seq = ++seq_;
    slots_[seq % kSlots].n.store(-1);
    ticket_.store(seq << 32);
  }

  // Workers (threads 1..): run published phases until finish().
  void worker() {
    uint64_t seen = 0;
    for (;;) {
      uint64_t t = ticket_.load();
      while ((t >> 32) == seen) {
        BITENGINE_PAUSE();
        t = ticket_.load();
      }
      seen = t >> 32;
      Slot& s = slots_[seen % kSlots];
      if (s.n.load() < 0) return;
      work(seen, s);
    }
  }

 private:
  static constexpr int kSlots = 4;
  // A worker may read a slot while the driver refills it for a later phase (it then fails the
  // claim's compare-and-swap and runs nothing), so the fields are atomics.
  struct Slot {
    std::atomic<int64_t> n{0};
    std::atomic<const std::function<void(int64_t)>*> fn{nullptr};
    std::atomic<int64_t> done{0};
  };

  // Claim and run items of phase `seq` until it has none left (or is no longer current).
  void work(uint64_t seq, Slot& s) {
    const int64_t n = s.n.load();
    const std::function<void(int64_t)>* fn = s.fn.load();
    uint64_t t = ticket_.load();
    for (;;) {
      if ((t >> 32) != seq || (int64_t)(t & 0xffffffffu) >= n) return;
      if (!ticket_.compare_exchange_weak(t, t + 1)) continue;  // t reloaded on failure
      (*fn)((int64_t)(t & 0xffffffffu));
      s.done.fetch_add(1);
      t = ticket_.load();
    }
  }

  std::atomic<uint64_t> ticket_{0};  // (phase number << 32) | next unclaimed item
  uint64_t seq_ = 0;                 // driver's phase counter
  Slot slots_[kSlots];
};

}  // namespace bitengine_cpu
