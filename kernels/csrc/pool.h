// How the kernels spread work over threads: Pool::run(n, threads, fn).
//
// Built with OpenMP (the default build, -fopenmp): the items run in an OpenMP
// parallel region, claimed with an atomic counter. Loaded into a process that
// has torch, the library's libgomp dependency resolves to the libgomp torch
// already loaded (same soname), so our regions run on torch's own thread
// team. That matters because libgomp's workers spin after every torch op
// (GOMP_SPINCOUNT, up to ~15 ms with Intel's ~140-cycle PAUSE): a second pool
// of our own had to share the cores with those spinning threads. Measured on
// a 2-core Xeon (Emerald Rapids), interleaved with torch ops as in a model's
// forward: the FFN gate stream 19 -> 24 GB/s, a 768->3072 BSR layer at 90%
// with 128 tokens 2.4x -> 3.8x dense torch.
//
// Without OpenMP (a compiler lacking it): our own pool. The caller publishes a
// job of n items, helpers that are awake claim items with an atomic counter,
// the caller claims items too, and waits only for items already claimed (a
// helper that never got a core claims nothing and is not waited for).
// Helpers spin briefly (kSpin) for the next job, then sleep on a condition
// variable.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>
#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SP_PAUSE() _mm_pause()
#else
#define SP_PAUSE() std::this_thread::yield()
#endif

namespace sp {

class Pool {
public:
    static Pool& get() {
        static Pool* pool = new Pool;  // never destroyed: helpers must not be joined during interpreter exit
        return *pool;
    }

    // Run fn(item, slot) for item in [0, n) on up to `threads` threads (slot 0
    // is the caller). Returns when every item has run.
    void run(int64_t n, int threads, const std::function<void(int64_t, int)>& fn) {
        if (n <= 0) return;
        if (threads <= 1 || n == 1) {
            for (int64_t i = 0; i < n; ++i) fn(i, 0);
            return;
        }
#if defined(_OPENMP)
        {
            std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(threads)
            {
                const int slot = omp_get_thread_num();
                for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i, slot);
            }
            return;
        }
#endif
        std::lock_guard<std::mutex> one_job(job_mutex_);  // jobs from several Python threads queue here
        ensure(threads - 1);
        const uint64_t job = epoch_.load() + 1;
        fn_ = &fn;
        active_.store(threads - 1);
        n_items_.store(n);
        done_.store(0);
        next_.store(job << 32);  // claims carry the job id: stale claims of an old job fail
        {
            std::lock_guard<std::mutex> lk(m_);
            epoch_.store(job);
        }
        if (sleeping_.load() > 0) cv_.notify_all();
        work(job, 0);
        while (done_.load() < n) SP_PAUSE();
        next_.store((job << 32) | 0xffffffffull);  // closed
    }

private:
    // About 0.1 ms of spinning (PAUSE is ~65 cycles on recent x86) before
    // sleeping: long enough to catch the next layer's call in a decode loop,
    // short enough not to steal a core from torch's own threads in between.
    static constexpr int kSpin = 2000;

    Pool() = default;

    void ensure(int helpers) {
        while ((int)workers_.size() < helpers) {
            int slot = (int)workers_.size() + 1;
            workers_.emplace_back([this, slot] { loop(slot); });
        }
    }

    void loop(int slot) {
        uint64_t seen = epoch_.load();
        for (;;) {
            for (int spin = 0; spin < kSpin && epoch_.load() == seen; ++spin) SP_PAUSE();
            if (epoch_.load() == seen) {
                std::unique_lock<std::mutex> lk(m_);
                sleeping_.fetch_add(1);
                cv_.wait(lk, [&] { return epoch_.load() != seen; });
                sleeping_.fetch_sub(1);
            }
            seen = epoch_.load();
            if (slot > active_.load()) continue;
            work(seen, slot);
        }
    }

    // Claim and run items of `job` until none is left (or the job is over).
    void work(uint64_t job, int slot) {
        for (;;) {
            uint64_t v = next_.load();
            if ((v >> 32) != job) return;
            const int64_t i = (int64_t)(v & 0xffffffffull);
            if (i >= n_items_.load()) return;
            if (!next_.compare_exchange_weak(v, v + 1)) continue;
            (*fn_)(i, slot);
            done_.fetch_add(1);
        }
    }

    std::vector<std::thread> workers_;
    std::mutex job_mutex_, m_;
    std::condition_variable cv_;
    std::atomic<uint64_t> epoch_{0};
    std::atomic<uint64_t> next_{0};
    std::atomic<int64_t> done_{0}, n_items_{0};
    std::atomic<int> active_{0}, sleeping_{0};
    const std::function<void(int64_t, int)>* fn_ = nullptr;
};

}  // namespace sp
