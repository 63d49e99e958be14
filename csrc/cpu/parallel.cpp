// The CPU thread pool (see parallel.h for why and how).
#include "cpu/parallel.h"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FASTMLP_PAUSE() _mm_pause()
#else
#define FASTMLP_PAUSE() std::this_thread::yield()
#endif

#include "check.h"
#include "cpu/fpenv.h"
#include "fastmlp.h"

namespace fastmlp {
namespace cpu {
namespace {

// Spins of an idle worker before it sleeps: ~30-100 us of pause instructions,
// longer than the gaps between the kernels of one training step.
constexpr int kSpins = 4000;
// Spins of the calling thread waiting for the last chunks before it yields
// its core (a few microseconds: a running worker finishes a chunk by then).
constexpr int kWaitSpins = 200;

// Chunks have a home thread: thread t (the caller is 0, worker w is w + 1)
// first claims the contiguous block [chunks*t/T, chunks*(t+1)/T), in order,
// then takes what is still unclaimed elsewhere, from the end backwards. So a
// kernel that runs every step (a GEMM's column bands, the optimizer's range)
// finds its data in the same core's cache step after step, and a thread that
// is late or descheduled still leaves its chunks to the others.
struct Job {
    ChunkFn fn;
    void* ctx;
    int64_t chunks;
    int threads;                     // T
    std::atomic<uint8_t>* claimed;   // chunks flags, 0 = free
    std::atomic<int64_t> done{0};    // chunks finished
    FpControl fp;                    // the caller's FP control word (cpu/fpenv.h)
};

// The flush-denormal switch (cpu/fpenv.h); read by every kernel call.
std::atomic<bool> g_flush_denormal{true};

int env_threads() {
    for (const char* name : {"FASTMLP_NUM_THREADS", "OMP_NUM_THREADS"}) {
        const char* v = std::getenv(name);
        if (v && *v) {
            const int n = std::atoi(v);  // "4,2" (OpenMP's nested list) reads as 4
            if (n >= 1) return n;
        }
    }
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        const int n = CPU_COUNT(&set);
        if (n >= 1) return n;
    }
#endif
    const unsigned hc = std::thread::hardware_concurrency();
    return hc >= 1 ? static_cast<int>(hc) : 1;
}

thread_local bool tl_in_chunk = false;

class Pool {
public:
    static Pool& get() {
        // Never destroyed: workers may still be sleeping at interpreter exit,
        // and joining them from a static destructor can deadlock.
        static Pool* pool = new Pool();
        return *pool;
    }

    int threads() const { return threads_.load(std::memory_order_relaxed); }
    void set_threads(int n) { threads_.store(n, std::memory_order_relaxed); }

    void run(int64_t chunks, int threads, ChunkFn fn, void* ctx) {
        std::unique_lock<std::mutex> busy(submit_, std::try_to_lock);
        if (tl_in_chunk || !busy.owns_lock()) {  // nested, or another thread's loop: inline
            for (int64_t i = 0; i < chunks; ++i) fn(ctx, i);
            return;
        }
        ensure_workers(threads - 1);
        if (claimed_size_ < chunks) {
            claimed_.reset(new std::atomic<uint8_t>[static_cast<size_t>(chunks)]);
            claimed_size_ = chunks;
        }
        for (int64_t i = 0; i < chunks; ++i) claimed_[i].store(0, std::memory_order_relaxed);
        Job job;
        job.fn = fn;
        job.ctx = ctx;
        job.chunks = chunks;
        job.threads = threads;
        job.claimed = claimed_.get();
        job.fp = fp_control();  // workers run the job in the caller's FP mode
        wanted_.store(threads - 1, std::memory_order_relaxed);
        current_.store(&job, std::memory_order_seq_cst);
        generation_.fetch_add(1, std::memory_order_seq_cst);
        if (sleepers_.load(std::memory_order_seq_cst) > 0) {
            std::lock_guard<std::mutex> lk(mu_);
            cv_.notify_all();
        }
        work_on(job, 0);
        // Every chunk is claimed; wait for those other threads are still running.
        // Spin briefly, then yield: the thread being waited for may have been
        // placed on this very core (a worker woken from sleep often is), and
        // pure spinning would keep it off until the scheduler's next tick.
        for (int spins = 0; job.done.load(std::memory_order_acquire) < chunks; ++spins)
            spin_or_yield(spins);
        // Retire the job, then wait for workers that picked up its pointer to let go.
        current_.store(nullptr, std::memory_order_seq_cst);
        for (int spins = 0; inside_.load(std::memory_order_seq_cst) != 0; ++spins)
            spin_or_yield(spins);
    }

private:
    Pool() : threads_(env_threads()) {}

    static void spin_or_yield(int spins) {
        if (spins < kWaitSpins) FASTMLP_PAUSE();
        else std::this_thread::yield();
    }

    static bool claim(Job& job, int64_t i) {
        return job.claimed[i].load(std::memory_order_relaxed) == 0 &&
               job.claimed[i].exchange(1, std::memory_order_acq_rel) == 0;
    }

    static void run_chunk(Job& job, int64_t i) {
        job.fn(job.ctx, i);
        job.done.fetch_add(1, std::memory_order_release);
    }

    // Thread `tid` of the job: its home block first, then whatever is left.
    static void work_on(Job& job, int tid) {
        tl_in_chunk = true;
        const int64_t lo = job.chunks * tid / job.threads, hi = job.chunks * (tid + 1) / job.threads;
        for (int64_t i = lo; i < hi; ++i)
            if (claim(job, i)) run_chunk(job, i);
        for (int64_t i = job.chunks - 1; i >= 0; --i)
            if ((i < lo || i >= hi) && claim(job, i)) run_chunk(job, i);
        tl_in_chunk = false;
    }

    void ensure_workers(int n) {
        while (static_cast<int>(workers_.size()) < n) {
            const int id = static_cast<int>(workers_.size());
            workers_.emplace_back([this, id] { worker(id); });
            workers_.back().detach();
        }
    }

    void worker(int id) {
        uint64_t seen = generation_.load(std::memory_order_acquire);
        for (;;) {
            int spins = 0;
            while (generation_.load(std::memory_order_acquire) == seen && spins < kSpins) {
                FASTMLP_PAUSE();
                ++spins;
            }
            if (generation_.load(std::memory_order_acquire) == seen) {
                std::unique_lock<std::mutex> lk(mu_);
                sleepers_.fetch_add(1, std::memory_order_seq_cst);
                cv_.wait(lk, [&] { return generation_.load(std::memory_order_seq_cst) != seen; });
                sleepers_.fetch_sub(1, std::memory_order_seq_cst);
            }
            seen = generation_.load(std::memory_order_acquire);
            if (id >= wanted_.load(std::memory_order_relaxed)) continue;  // fewer threads asked
            inside_.fetch_add(1, std::memory_order_seq_cst);
            Job* job = current_.load(std::memory_order_seq_cst);
            if (job != nullptr) {
                // The caller's flush-denormal (and rounding) mode for this job only.
                const FpControl own = fp_control();
                if (job->fp != own) set_fp_control(job->fp);
                work_on(*job, id + 1);
                if (job->fp != own) set_fp_control(own);
            }
            inside_.fetch_sub(1, std::memory_order_seq_cst);
        }
    }

    std::atomic<int> threads_;
    std::mutex submit_;                 // one parallel loop at a time
    std::vector<std::thread> workers_;  // detached; kept for the count
    std::unique_ptr<std::atomic<uint8_t>[]> claimed_;  // the job's chunk flags (submit_ held)
    int64_t claimed_size_ = 0;
    std::atomic<Job*> current_{nullptr};
    std::atomic<uint64_t> generation_{0};
    std::atomic<int> inside_{0};        // workers holding current_
    std::atomic<int> wanted_{0};        // workers the current job may use
    std::atomic<int> sleepers_{0};
    std::mutex mu_;
    std::condition_variable cv_;
};

}  // namespace

void run_chunks(int64_t chunks, int threads, ChunkFn fn, void* ctx) {
    Pool::get().run(chunks, threads, fn, ctx);
}

int pool_threads() { return Pool::get().threads(); }

int num_threads() { return pool_threads(); }

bool flush_denormal() { return g_flush_denormal.load(std::memory_order_relaxed); }

void set_flush_denormal(bool on) { g_flush_denormal.store(on, std::memory_order_relaxed); }

bool flush_denormal_supported() { return kFlushSupported; }

void set_num_threads(int n) {
    FASTMLP_CHECK(n >= 1, "set_num_threads: need at least 1 thread, got " << n);
    Pool::get().set_threads(n);
}

}  // namespace cpu
}  // namespace fastmlp
