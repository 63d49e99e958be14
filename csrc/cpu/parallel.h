// Threads for the CPU kernels: a small pool whose parallel loops never wait
// for a thread that is not running.
//
// Why not OpenMP: an OpenMP parallel region ends in a barrier that waits for
// every thread of the team. On a shared machine (CI, a laptop running other
// work) one of those threads is often descheduled, and every region then
// waits for the scheduler to run it again -- fit at batch 32 went from 1.2 s
// to 20-40 s per epoch while another process used one of the two cores.
// Here the work is cut into chunks that threads claim; the calling thread
// claims chunks too, and returns as soon as every chunk is done. A worker that
// wakes late finds nothing left and goes back to sleep, so a loaded machine
// costs at most the parallel speed-up, never more. Each thread first claims
// its own contiguous block of chunks (thread t of T: chunks*t/T ..), then the
// others' leftovers: a kernel run every step finds its share of the data in
// the same core's L2 (the seed model's Fashion-MNIST epoch at batch 32 on 2
// AMD EPYC cores: 0.32 s with first-come chunks, 0.27 s this way).
//
// Idle workers spin briefly (a training step's kernels follow each other
// within microseconds), then sleep on a condition variable, so they do not
// compete with NumPy's BLAS threads or anything else between calls.
//
// Threads: set_num_threads(n), else FASTMLP_NUM_THREADS, else OMP_NUM_THREADS
// (its first value), else the CPUs this process may run on.
//
// Results never depend on the thread count: callers split work so that each
// output element is computed by one chunk in a fixed order.
#pragma once

#include <atomic>
#include <cstdint>

namespace fastmlp {
namespace cpu {

// Below this many elements a parallel loop costs more than it saves (waking a
// worker is ~1-5 us; a core streams ~10 floats per ns).
constexpr int64_t kParMin = 32768;

using ChunkFn = void (*)(void* ctx, int64_t chunk);

// Runs fn(ctx, i) for i in [0, chunks), spread over up to `threads` threads
// (the caller included). Returns when all are done. fn must not throw. Called
// from inside a chunk, or while another thread's loop holds the pool, it runs
// the chunks inline on the calling thread.
void run_chunks(int64_t chunks, int threads, ChunkFn fn, void* ctx);

// The threads the CPU kernels use.
int pool_threads();

// f(i) for i in [0, chunks), in parallel (f: a callable taking int64_t).
template <class F>
inline void parallel_chunks(int64_t chunks, int threads, F& f) {
    if (chunks <= 1 || threads <= 1) {
        for (int64_t i = 0; i < chunks; ++i) f(i);
        return;
    }
    run_chunks(chunks, threads, [](void* ctx, int64_t i) { (*static_cast<F*>(ctx))(i); }, &f);
}

// Chunks per thread in the loops below: a worker descheduled in the middle of
// its chunk holds up the caller for that chunk only, so smaller chunks bound
// the damage on a loaded machine; 4 keeps the claiming overhead negligible.
constexpr int kChunksPerThread = 4;

// f(lo, hi) over [0, n) cut into kChunksPerThread contiguous ranges per thread
// (a single range on the calling thread when !parallel).
template <class F>
inline void parallel_range(int64_t n, bool parallel, F&& f) {
    const int threads = parallel ? pool_threads() : 1;
    const int64_t want = static_cast<int64_t>(threads) * (threads > 1 ? kChunksPerThread : 1);
    const int64_t parts = n < want ? (n > 0 ? n : 1) : want;
    auto chunk = [&](int64_t t) {
        const int64_t lo = n * t / parts, hi = n * (t + 1) / parts;
        if (hi > lo) f(lo, hi);
    };
    parallel_chunks(parts, threads, chunk);
}

// first = min(first, r), from any thread: min is order-independent, so the
// result is deterministic (the first bad row / element a parallel scan found).
inline void atomic_min(std::atomic<int64_t>& first, int64_t r) {
    int64_t cur = first.load(std::memory_order_relaxed);
    while (r < cur && !first.compare_exchange_weak(cur, r, std::memory_order_relaxed)) {
    }
}

}  // namespace cpu
}  // namespace fastmlp

// target_clones: one portable binary with AVX-512, AVX2+FMA and baseline
// versions of the hot loops, picked at load time from the CPU's features.
// (No -march=native: a wheel built here must run on any x86-64.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FASTMLP_SIMD_CLONES \
    __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTMLP_SIMD_CLONES
#endif
