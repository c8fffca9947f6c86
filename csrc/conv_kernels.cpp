// Convolutions, large matrix products and the thread pool of the CPU device.
//
// offload owns its CPU parallelism: a pool of set_num_threads(n) - 1 helper threads (they sleep
// on a condition variable when idle: no spinning) plus the calling thread. Small work runs on
// the calling thread alone. Matrix products call the BLAS that NumPy loaded (OpenBLAS, located
// by threadpoolctl in Python) single-threaded from the pool's threads, with OpenBLAS's own
// threads held at one while any offload product runs, so that its spinning pool is never used.
//
//   conv_direct: convolutions computed on the padded input grid: stride 1 vectorised over output
//       positions, a block of 8 output channels per pass (AVX2 and older: thin layers, 1-D
//       convolutions); on AVX-512 with the output channels in the vectors (also strides 2 wide).
//   conv_gemm: im2col (skipped for 1x1 stride-1 unpadded) + SGEMM per image.
//   gemm_dense: y = act(x @ w + bias + residual) split by rows over the pool.
// Each applies the bias/residual/activation epilogue on the tile it just wrote.
//
// Every entry point checks shapes, strides, dtypes and overlaps before touching memory.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <dlfcn.h>
#include <immintrin.h>
#include <pthread.h>


#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <new>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "gemm.h"
#include "checks.h"
#include "pool.h"

namespace nb = nanobind;

namespace {

using In = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using Out = nb::ndarray<float, nb::c_contig, nb::device::cpu>;

// ---------------------------------------------------------------------------------------------
// The pool.

struct Job {
    const std::function<void(std::int64_t)> *fn;
    std::int64_t count;
    std::atomic<std::int64_t> next{0}, done{0};
    std::atomic<bool> failed{false};
};

class Pool {
  public:
    int threads() const { return threads_.load(); }

    // n threads in all (the caller included): n - 1 helpers.
    void resize(int n) {
        std::lock_guard<std::mutex> use(use_);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            stop_ = true;
        }
        wake_.notify_all();
        for (auto &t : workers_) t.join();
        workers_.clear();
        std::lock_guard<std::mutex> lock(mutex_);
        stop_ = false;
        for (int i = 1; i < n; ++i)
            workers_.emplace_back([this, seen = generation_.load()] { loop(seen); });
        threads_.store(n);
    }

    // fn(i) for i in [0, count): on the pool when it is free and parallel is true, else on the
    // calling thread alone (a nested call, or another caller holding the pool, runs inline).
    // The caller returns when every item is done; a helper that wakes late finds none left.
    void run(std::int64_t count, const std::function<void(std::int64_t)> &fn, bool parallel) {
        if (count <= 0) return;
        if (!parallel || count == 1 || threads_.load() <= 1 || in_pool_) {
            for (std::int64_t i = 0; i < count; ++i) fn(i);
            return;
        }
        std::unique_lock<std::mutex> use(use_, std::try_to_lock);
        if (!use.owns_lock() || workers_.empty()) {
            for (std::int64_t i = 0; i < count; ++i) fn(i);
            return;
        }
        auto job = std::make_shared<Job>();
        job->fn = &fn;
        job->count = count;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            job_ = job;
            ++generation_;
        }
        wake_.notify_all();
        in_pool_ = true;
        work(*job);
        in_pool_ = false;
        spin([&] { return job->done.load() == job->count; });
        std::unique_lock<std::mutex> lock(mutex_);
        done_.wait(lock, [&] { return job->done.load() == job->count; });
        job_.reset();
        lock.unlock();
        if (job->failed.load()) throw std::bad_alloc();
    }

    // How long a helper keeps polling for the next job, and the caller for the last items,
    // before sleeping on the condition variable: a wake-up costs 10-30 us on these VMs, more than
    // a batch-1 layer; a model's parallel ops come microseconds apart. Past it nothing spins.
    static constexpr auto kSpin = std::chrono::microseconds(50);

  private:
    template <typename Ready> static bool spin(Ready ready) {
        const auto until = std::chrono::steady_clock::now() + kSpin;
        for (int i = 0;; ++i) {
            if (ready()) return true;
            __builtin_ia32_pause();
            if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) return false;
        }
    }

    void work(Job &j) {
        for (std::int64_t i; (i = j.next.fetch_add(1)) < j.count;) {
            try {
                (*j.fn)(i);
            } catch (...) {  // scratch that could not grow: the caller raises MemoryError
                j.failed.store(true);
            }
            if (j.done.fetch_add(1) + 1 == j.count) {
                std::lock_guard<std::mutex> lock(mutex_);
                done_.notify_all();
            }
        }
    }

    void loop(std::uint64_t seen) {
        in_pool_ = true;
        offload::FlushDenormals ftz;  // a helper runs nothing but the kernels' items
        for (;;) {
            std::shared_ptr<Job> job;
            spin([&] { return generation_.load(std::memory_order_acquire) != seen; });
            {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return stop_ || generation_.load() != seen; });
                if (stop_) return;
                seen = generation_.load();
                job = job_;
            }
            if (job) work(*job);
        }
    }

    std::mutex use_;    // one caller uses the helpers at a time
    std::mutex mutex_;  // guards job_, generation_, stop_
    std::condition_variable wake_, done_;
    std::vector<std::thread> workers_;
    std::shared_ptr<Job> job_;
    std::atomic<std::uint64_t> generation_{0};  // written under mutex_, polled without it
    bool stop_ = false;
    std::atomic<int> threads_{1};
    static thread_local bool in_pool_;
};
thread_local bool Pool::in_pool_ = false;

// A forked child has none of the parent's helper threads (and their mutexes may be held):
// it starts a new pool of the same size at its first parallel op.
std::atomic<Pool *> g_pool{nullptr};
std::atomic<int> g_pool_after_fork{0};

void pool_after_fork() {
    Pool *old = g_pool.load();
    g_pool_after_fork.store(old ? old->threads() : 0);
    g_pool.store(nullptr);  // the old one is leaked: its threads do not exist here
}

Pool &pool() {
    static const bool registered = [] { return pthread_atfork(nullptr, nullptr, pool_after_fork) == 0; }();
    (void) registered;
    Pool *p = g_pool.load();
    if (!p) {
        static std::mutex make;
        std::lock_guard<std::mutex> lock(make);
        p = g_pool.load();
        if (!p) {
            p = new Pool();  // never destroyed: helpers must not be joined at exit
            if (int n = g_pool_after_fork.exchange(0); n > 1) p->resize(n);
            g_pool.store(p);
        }
    }
    return *p;
}

// Work below this many multiply-adds runs on the calling thread: waking helpers costs more.
std::atomic<std::int64_t> g_parallel_macs{1 << 21};

// Per-thread scratch that only grows (im2col columns, padded images).
float *scratch(std::size_t floats, int slot) {
    thread_local std::vector<float> buffers[2];
    std::vector<float> &b = buffers[slot];
    if (b.size() < floats) b.resize(floats);
    return b.data();
}

// ---------------------------------------------------------------------------------------------
// BLAS: the SGEMM of the library NumPy loaded, found by name in the file threadpoolctl reports.

using sgemm64_fn = void (*)(int, int, int, std::int64_t, std::int64_t, std::int64_t, float,
                            const float *, std::int64_t, const float *, std::int64_t, float,
                            float *, std::int64_t);
using sgemm32_fn = void (*)(int, int, int, int, int, int, float, const float *, int,
                            const float *, int, float, float *, int);
using set_threads_fn = void (*)(int);
using get_threads_fn = int (*)();

struct Blas {
    std::mutex mutex;
    sgemm64_fn sgemm64 = nullptr;
    sgemm32_fn sgemm32 = nullptr;
    set_threads_fn set_threads = nullptr;
    get_threads_fn get_threads = nullptr;
    std::string name;
    int holders = 0, saved = 1;  // offload products running; OpenBLAS's threads before them
};
Blas g_blas;

constexpr int kRowMajor = 101, kNoTrans = 111;

// Loads the SGEMM from ``path``; returns the symbol used, or "" when none fits.
std::string blas_load(const std::string &path) {
    if (path.find('\0') != std::string::npos)
        throw nb::value_error("blas_load(): the path holds a NUL byte");
    std::lock_guard<std::mutex> lock(g_blas.mutex);
    if (!g_blas.name.empty()) return g_blas.name;
    void *lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    if (!lib) return "";
    struct Names { const char *gemm, *set, *get; bool ilp64; };
    const Names candidates[] = {
        {"scipy_cblas_sgemm64_", "scipy_openblas_set_num_threads64_",
         "scipy_openblas_get_num_threads64_", true},
        {"scipy_cblas_sgemm", "scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads",
         false},
        {"cblas_sgemm64_", "openblas_set_num_threads64_", "openblas_get_num_threads64_", true},
        {"cblas_sgemm", "openblas_set_num_threads", "openblas_get_num_threads", false},
    };
    for (const Names &c : candidates) {
        void *g = dlsym(lib, c.gemm), *s = dlsym(lib, c.set), *t = dlsym(lib, c.get);
        if (!g || !s || !t) continue;
        if (c.ilp64) g_blas.sgemm64 = reinterpret_cast<sgemm64_fn>(g);
        else g_blas.sgemm32 = reinterpret_cast<sgemm32_fn>(g);
        g_blas.set_threads = reinterpret_cast<set_threads_fn>(s);
        g_blas.get_threads = reinterpret_cast<get_threads_fn>(t);
        g_blas.name = c.gemm;
        return g_blas.name;  // the handle stays open: NumPy keeps the library loaded anyway
    }
    dlclose(lib);
    return "";
}

bool blas_ready() {
    std::lock_guard<std::mutex> lock(g_blas.mutex);
    return !g_blas.name.empty();
}

// While alive, OpenBLAS runs every product on the calling thread (its threads stay asleep).
struct BlasSingleThread {
    BlasSingleThread() {
        std::lock_guard<std::mutex> lock(g_blas.mutex);
        if (g_blas.holders++ == 0) {
            g_blas.saved = g_blas.get_threads();
            if (g_blas.saved != 1) g_blas.set_threads(1);
        }
    }
    ~BlasSingleThread() {
        std::lock_guard<std::mutex> lock(g_blas.mutex);
        if (--g_blas.holders == 0 && g_blas.saved != 1) g_blas.set_threads(g_blas.saved);
    }
};

// C[m, n] (row stride ldc) = A[m, k] (lda) @ B[k, n] (ldb); row-major, no transposes.
void sgemm(std::int64_t m, std::int64_t n, std::int64_t k, const float *a, std::int64_t lda,
           const float *b, std::int64_t ldb, float *c, std::int64_t ldc) {
    if (m <= 0 || n <= 0) return;
    if (k == 0) {
        for (std::int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.f);
        return;
    }
    if (g_blas.sgemm64)
        g_blas.sgemm64(kRowMajor, kNoTrans, kNoTrans, m, n, k, 1.f, a, lda, b, ldb, 0.f, c, ldc);
    else
        g_blas.sgemm32(kRowMajor, kNoTrans, kNoTrans, (int) m, (int) n, (int) k, 1.f, a,
                       (int) lda, b, (int) ldb, 0.f, c, (int) ldc);
}

// ---------------------------------------------------------------------------------------------
// Epilogue (codes of offload/drivers/cpu.py ACTIVATION_CODES).

enum Activation : int { kIdentity = 0, kRelu, kLeakyRelu, kSigmoid, kTanh, kClip };

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define CONV_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CONV_CLONES
#endif

struct Act {
    int code;
    float alpha, lo, hi;
};

// o[j] = act(o[j] + add + r[j]) for j < n (r may be null).
CONV_CLONES
void finish_row(float *o, std::int64_t n, float add, const float *r, Act a) {
    if (r)
        for (std::int64_t j = 0; j < n; ++j) o[j] += add + r[j];
    else if (add != 0.f)
        for (std::int64_t j = 0; j < n; ++j) o[j] += add;
    switch (a.code) {
    case kRelu:
        for (std::int64_t j = 0; j < n; ++j) o[j] = o[j] > 0.f ? o[j] : (o[j] != o[j] ? o[j] : 0.f);
        break;
    case kLeakyRelu:
        for (std::int64_t j = 0; j < n; ++j) o[j] = o[j] >= 0.f ? o[j] : o[j] * a.alpha;
        break;
    case kSigmoid:
        for (std::int64_t j = 0; j < n; ++j) o[j] = 1.f / (1.f + std::exp(-o[j]));
        break;
    case kTanh:
        for (std::int64_t j = 0; j < n; ++j) o[j] = std::tanh(o[j]);
        break;
    case kClip:
        for (std::int64_t j = 0; j < n; ++j)
            o[j] = o[j] != o[j] ? o[j] : std::min(std::max(o[j], a.lo), a.hi);
        break;
    default:
        break;
    }
}

// o[j] = act(t[j] + add + r[j]): a tile row copied out with the epilogue, in one pass.
CONV_CLONES
void store_row(float *o, const float *t, std::int64_t n, float add, const float *r, Act a) {
    if (a.code == kRelu) {
        if (r)
            for (std::int64_t j = 0; j < n; ++j) {
                const float v = t[j] + add + r[j];
                o[j] = v > 0.f ? v : (v != v ? v : 0.f);
            }
        else
            for (std::int64_t j = 0; j < n; ++j) {
                const float v = t[j] + add;
                o[j] = v > 0.f ? v : (v != v ? v : 0.f);
            }
        return;
    }
    if (r)
        for (std::int64_t j = 0; j < n; ++j) o[j] = t[j] + add + r[j];
    else
        for (std::int64_t j = 0; j < n; ++j) o[j] = t[j] + add;
    if (a.code != kIdentity) finish_row(o, n, 0.f, nullptr, a);
}

// ---------------------------------------------------------------------------------------------
// Checks.


using offload::check_apart;
using offload::shape_of;

Act make_act(const char *fn, int act, float alpha, float lo, float hi) {
    OFFLOAD_CHECK(act >= kIdentity && act <= kClip,
          std::string(fn) + ": activation code must be 0..5, got " + std::to_string(act));
    return Act{act, alpha, lo, hi};
}

// Elements in a product of non-negative sizes, or -1 past 2**62.
std::int64_t product(std::initializer_list<std::int64_t> dims) {
    std::int64_t p = 1;
    for (std::int64_t d : dims) {
        if (d < 0) return -1;
        if (d && p > (std::int64_t(1) << 62) / d) return -1;
        p *= d;
    }
    return p;
}

// The geometry of one convolution, checked against x, y and the weights.
struct Geometry {
    std::int64_t n, c, h, w, m, kh, kw, oh, ow, sh, sw, dh, dw, pt, pl, pb, pr;
    std::int64_t hp() const { return h + pt + pb; }
    std::int64_t wp() const { return w + pl + pr; }
};

// The convolution's geometry, checked against x and out; with ``pooled``, out holds the
// convolution's output after a 2x2 stride-2 pool ([N, M, OH / 2, OW / 2]) and g.oh, g.ow are the
// convolution's own output sizes.
Geometry geometry(const char *fn, const In &x, const Out &y, std::int64_t m, std::int64_t c_w,
                  std::int64_t kh, std::int64_t kw, const std::vector<std::int64_t> &strides,
                  const std::vector<std::int64_t> &pads, const std::vector<std::int64_t> &dil,
                  bool pooled = false) {
    const std::string f(fn);
    OFFLOAD_CHECK(x.ndim() == 4 && y.ndim() == 4, f + ": expected 4-D x and out (NCHW), got x " +
                                              shape_of(x) + ", out " + shape_of(y));
    OFFLOAD_CHECK(strides.size() == 2 && dil.size() == 2 && pads.size() == 4,
          f + ": expected 2 strides, 2 dilations and 4 pads (top, left, bottom, right)");
    Geometry g{(std::int64_t) x.shape(0), (std::int64_t) x.shape(1), (std::int64_t) x.shape(2),
               (std::int64_t) x.shape(3), m, kh, kw, (std::int64_t) y.shape(2),
               (std::int64_t) y.shape(3), strides[0], strides[1], dil[0], dil[1], pads[0],
               pads[1], pads[2], pads[3]};
    OFFLOAD_CHECK(g.sh >= 1 && g.sw >= 1 && g.dh >= 1 && g.dw >= 1 && g.sh <= (1 << 20) &&
              g.sw <= (1 << 20) && g.dh <= (1 << 20) && g.dw <= (1 << 20),
          f + ": strides and dilations must be 1 to 2**20");
    OFFLOAD_CHECK(g.pt >= 0 && g.pl >= 0 && g.pb >= 0 && g.pr >= 0 && g.pt <= (1 << 20) &&
              g.pl <= (1 << 20) && g.pb <= (1 << 20) && g.pr <= (1 << 20),
          f + ": pads must be 0 to 2**20");
    OFFLOAD_CHECK(kh >= 1 && kw >= 1, f + ": the kernel must be at least 1x1");
    OFFLOAD_CHECK(c_w == g.c, f + ": weights have " + std::to_string(c_w) + " input channels, x has " +
                          std::to_string(g.c));
    const std::int64_t span_h = g.dh * (kh - 1) + 1, span_w = g.dw * (kw - 1) + 1;
    const std::int64_t want_oh = g.hp() >= span_h ? (g.hp() - span_h) / g.sh + 1 : 0;
    const std::int64_t want_ow = g.wp() >= span_w ? (g.wp() - span_w) / g.sw + 1 : 0;
    const std::int64_t f_out = pooled ? 2 : 1;
    OFFLOAD_CHECK((std::int64_t) y.shape(0) == g.n && (std::int64_t) y.shape(1) == m &&
              g.oh == want_oh / f_out && g.ow == want_ow / f_out,
          f + ": out must be [" + std::to_string(g.n) + ", " + std::to_string(m) + ", " +
              std::to_string(want_oh / f_out) + ", " + std::to_string(want_ow / f_out) + "] for x " +
              shape_of(x) + (pooled ? " (the convolution pooled 2x2)" : "") + ", got " + shape_of(y));
    g.oh = want_oh;
    g.ow = want_ow;
    OFFLOAD_CHECK(product({g.n, g.c, g.hp(), g.wp()}) >= 0 && product({g.c, kh, kw, g.oh, g.ow}) >= 0 &&
              product({g.n, m, g.c, kh, kw, g.oh, g.ow}) >= 0,
          f + ": sizes too large");
    return g;
}

void check_epilogue_args(const char *fn, const Out &y, std::int64_t m,
                         const std::optional<In> &bias, const std::optional<In> &residual) {
    OFFLOAD_CHECK(!bias || (std::int64_t) bias->size() == m,
          std::string(fn) + ": bias must have " + std::to_string(m) + " values, got " +
              std::to_string(bias ? bias->size() : 0));
    OFFLOAD_CHECK(!residual || residual->size() == y.size(),
          std::string(fn) + ": residual must have out's " + std::to_string(y.size()) +
              " values, got " + std::to_string(residual ? residual->size() : 0));
    if (bias) check_apart(fn, "bias", y, *bias);
    if (residual) check_apart(fn, "residual", y, *residual, /*same_ok=*/true);
}

// ---------------------------------------------------------------------------------------------
// Direct convolution (stride 1): on the padded image flattened to one row of Hp*Wp values,
// out[q] = sum_{c,i,j} w[c,i,j] * xp[c][q + i*dh*Wp + j*dw]; the outputs at q = oh*Wp + ow with
// ow < OW are the convolution, the others (the right border columns) are dropped.

constexpr int kMB = 8;  // output channels per pass (weights packed [ceil(M/8), C, kh, kw, 8])

// o[i] = max (or mean) of the 2x2 window t0[2i], t0[2i+1], t1[2i], t1[2i+1]; NaN propagates.
__attribute__((always_inline)) inline void pool_pairs(float *o, const float *t0, const float *t1,
                                                      std::int64_t n, bool is_max) {
    auto mx = [](float a, float b) { return (a > b || a != a) ? a : b; };
    if (is_max)
        for (std::int64_t i = 0; i < n; ++i)
            o[i] = mx(mx(t0[2 * i], t0[2 * i + 1]), mx(t1[2 * i], t1[2 * i + 1]));
    else
        for (std::int64_t i = 0; i < n; ++i)
            o[i] = (t0[2 * i] + t0[2 * i + 1] + t1[2 * i] + t1[2 * i + 1]) * 0.25f;
}

template <int VW, int NV, int MB>
__attribute__((always_inline)) inline void direct_tile(
    const float *xp, std::int64_t plane, const float *wb, std::int64_t c, std::int64_t taps,
    const std::int64_t *offs, std::int64_t q0, float *tile, std::int64_t ld) {
    typedef float vec __attribute__((vector_size(VW * 4)));
    typedef float uvec __attribute__((vector_size(VW * 4), aligned(4)));
    vec acc[MB][NV];
    for (int mm = 0; mm < MB; ++mm)
        for (int v = 0; v < NV; ++v) acc[mm][v] = vec{};
    for (std::int64_t ch = 0; ch < c; ++ch) {
        const float *xc = xp + ch * plane + q0;
        const float *wc = wb + ch * taps * kMB;
        for (std::int64_t t = 0; t < taps; ++t) {
            const float *src = xc + offs[t];
            vec xv[NV];
            for (int v = 0; v < NV; ++v) xv[v] = *reinterpret_cast<const uvec *>(src + v * VW);
            const float *wt = wc + t * kMB;
            for (int mm = 0; mm < MB; ++mm) {
                const float s = wt[mm];
                for (int v = 0; v < NV; ++v) acc[mm][v] += xv[v] * s;
            }
        }
    }
    for (int mm = 0; mm < MB; ++mm)
        for (int v = 0; v < NV; ++v)
            *reinterpret_cast<uvec *>(tile + mm * ld + v * VW) = acc[mm][v];
}

struct DirectJob {
    std::int64_t plane;     // Hp*Wp
    const float *w;         // packed weights
    const float *bias, *residual;
    float *y;
    Geometry g;
    Act act;
    int pool;               // 0, or a 2x2 stride-2 pool of the output: 1 max, 2 average
    std::vector<std::int64_t> offs;
};

// Output rows [r0, r1) of channel block mb of image n: tiles into a per-thread buffer of
// kMB rows of positions, then each output row copied out with the epilogue.
// MB output channels per pass (8 / MB passes per block): fewer channels and more positions
// when the vector registers are few (AVX2: 4 x 3 vectors of 8 accumulate in 12 of 16).
template <int VW, int NV, int MB>
__attribute__((always_inline)) inline void direct_block(const DirectJob &j, const float *xn,
                                                        std::int64_t n, std::int64_t mb,
                                                        std::int64_t r0, std::int64_t r1) {
    constexpr int TW = VW * NV;
    const Geometry &g = j.g;
    const std::int64_t taps = g.kh * g.kw, wp = g.wp(), ohw = g.oh * g.ow;
    const std::int64_t qs = r0 * wp, qe = (r1 - 1) * wp + g.ow;
    const std::int64_t ld = (qe - qs + TW - 1) / TW * TW;
    float *buf = scratch((std::size_t) (kMB * ld), 1);
    const float *wb = j.w + mb * g.c * taps * kMB;
    for (std::int64_t q = qs; q < qe; q += TW)
        for (int half = 0; half < kMB / MB; ++half)
            direct_tile<VW, NV, MB>(xn, j.plane, wb + half * MB, g.c, taps, j.offs.data(), q,
                                    buf + half * MB * ld + (q - qs), ld);
    const std::int64_t m0 = mb * kMB, mcount = std::min<std::int64_t>(kMB, g.m - m0);
    if (j.pool) {  // rows in pairs (r0 is even): bias and activation in place, then 2x2 windows
        const std::int64_t poh = g.oh / 2, pow_ = g.ow / 2;
        for (std::int64_t mm = 0; mm < mcount; ++mm) {
            const std::int64_t m = m0 + mm;
            const float add = j.bias ? j.bias[m] : 0.f;
            for (std::int64_t row = r0; row + 1 < r1 && row / 2 < poh; row += 2) {
                float *t0 = buf + mm * ld + (row * wp - qs), *t1 = t0 + wp;
                store_row(t0, t0, 2 * pow_, add, nullptr, j.act);
                store_row(t1, t1, 2 * pow_, add, nullptr, j.act);
                pool_pairs(j.y + (n * g.m + m) * poh * pow_ + row / 2 * pow_, t0, t1, pow_,
                           j.pool == 1);
            }
        }
        return;
    }
    for (std::int64_t mm = 0; mm < mcount; ++mm) {
        const std::int64_t m = m0 + mm;
        const float add = j.bias ? j.bias[m] : 0.f;
        for (std::int64_t row = r0; row < r1; ++row) {
            const std::int64_t at = (n * g.m + m) * ohw + row * g.ow;
            store_row(j.y + at, buf + mm * ld + (row * wp - qs), g.ow, add,
                      j.residual ? j.residual + at : nullptr, j.act);
        }
    }
}

__attribute__((target("avx512f,avx512vl,avx512dq,fma,avx2")))
void direct_avx512(const DirectJob &j, const float *xn, std::int64_t n, std::int64_t mb,
                   std::int64_t r0, std::int64_t r1) {
    direct_block<16, 2, 8>(j, xn, n, mb, r0, r1);
}

__attribute__((target("avx2,fma")))
void direct_avx2(const DirectJob &j, const float *xn, std::int64_t n, std::int64_t mb,
                 std::int64_t r0, std::int64_t r1) {
    direct_block<8, 3, 4>(j, xn, n, mb, r0, r1);
}

void direct_generic(const DirectJob &j, const float *xn, std::int64_t n, std::int64_t mb,
                    std::int64_t r0, std::int64_t r1) {
    direct_block<4, 2, 4>(j, xn, n, mb, r0, r1);
}

using direct_fn = void (*)(const DirectJob &, const float *, std::int64_t, std::int64_t,
                           std::int64_t, std::int64_t);
struct DirectKernel { direct_fn fn; int width; const char *name; };

const DirectKernel &direct_kernel() {
    static const DirectKernel k = [] {
        __builtin_cpu_init();
        if (offload::gemm::has_avx512())
            return DirectKernel{direct_avx512, 32, "avx512"};
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
            return DirectKernel{direct_avx2, 24, "avx2"};
        return DirectKernel{direct_generic, 8, "generic"};
    }();
    return k;
}

// ---------------------------------------------------------------------------------------------
// Direct convolution with the output channels in the vectors (AVX-512; weights packed
// [ceil(M/16), C, kh, kw, 16], panels of 16 output channels over the reduction k = (c, i, j)).
// A tile is P consecutive positions q of the flattened padded image x NB panels:
// t[q][m] = sum_k xp[q + koff[k]] * w[k][m], each input value broadcast from memory (a load, not
// a shuffle: the shuffle port is the second FMA port) into one or two weight vectors, 24-28
// accumulators. Bias and a vectorisable activation are applied in the registers; the tile's
// valid positions are then transposed 16x16 in registers into the NCHW output, 2x2-pooled on
// the way when a pool is fused, with the residual added before the activation when there is one.

namespace oc {

using i64 = std::int64_t;
constexpr int kLanes = 16;
constexpr i64 kKc = 128;  // reduction indices per pass over a chunk's tiles

struct Job {
    Geometry g;
    i64 plane, k, panels;
    const float *w;
    std::vector<float> bias;  // panels * 16 values, zeros past M
    std::vector<i64> koff;    // ch * plane + i * dh * Wp + j * dw for k = (ch, i, j)
    const float *residual;
    float *y;
    Act act;
    int pool;
    bool act_in_tile;  // no residual and a vectorised activation: applied in the tile
    bool act_vector;   // the activation has a vector form (else finish_row on the output)
};

#define OC_TARGET __attribute__((target("avx512f,avx512vl,avx512dq,fma,avx2")))

OC_TARGET __attribute__((always_inline)) inline __m512 act16(__m512 v, const Act &a) {
    switch (a.code) {
    case kRelu:  // max_ps returns its second operand when one is NaN: NaN propagates
        return _mm512_max_ps(_mm512_setzero_ps(), v);
    case kLeakyRelu:
        return _mm512_mask_mul_ps(v, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ), v,
                                  _mm512_set1_ps(a.alpha));
    case kClip:
        return _mm512_min_ps(_mm512_set1_ps(a.hi), _mm512_max_ps(_mm512_set1_ps(a.lo), v));
    default:
        return v;
    }
}

// Reduction indices [k0, k1): the accumulators start from zero (first) or from the partial sums
// the tile stored in t; the last range adds the bias (and the activation) before storing.
template <int P, int NB, int SW>
OC_TARGET __attribute__((always_inline)) inline void tile(const Job &j, const float *x,
                                                          const float *w, const float *bias,
                                                          float *t, i64 k0, i64 k1, bool first,
                                                          bool last) {
    __m512 acc[P][NB];
#pragma GCC unroll 32
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 2
        for (int n = 0; n < NB; ++n)
            acc[p][n] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(t + p * NB * kLanes + n * kLanes);
    const i64 K = j.k, *koff = j.koff.data();
    for (i64 k = k0; k < k1; ++k) {
        const float *s = x + koff[k];
        asm("" : "+r"(s));  // one base register for the P loads (GCC kept P bases, spilled)
        __m512 wv[NB];
#pragma GCC unroll 2
        for (int n = 0; n < NB; ++n) wv[n] = _mm512_loadu_ps(w + (n * K + k) * kLanes);
#pragma GCC unroll 32
        for (int p = 0; p < P; ++p) {
            const __m512 b = _mm512_set1_ps(s[p * SW]);
#pragma GCC unroll 2
            for (int n = 0; n < NB; ++n) acc[p][n] = _mm512_fmadd_ps(b, wv[n], acc[p][n]);
        }
    }
#pragma GCC unroll 2
    for (int n = 0; n < NB; ++n) {
        const __m512 bv = _mm512_loadu_ps(bias + n * kLanes);
#pragma GCC unroll 32
        for (int p = 0; p < P; ++p) {
            __m512 v = acc[p][n];
            if (last) {
                v = _mm512_add_ps(v, bv);
                if (j.act_in_tile) v = act16(v, j.act);
            }
            _mm512_storeu_ps(t + p * NB * kLanes + n * kLanes, v);
        }
    }
}

// max(x, y), NaN if either is (max_ps alone returns y when either is NaN)
OC_TARGET __attribute__((always_inline)) inline __m512 max_nan(__m512 x, __m512 y) {
    return _mm512_mask_mov_ps(_mm512_max_ps(x, y), _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}

// r[i][l] -> r[l][i]
OC_TARGET __attribute__((always_inline)) inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
        r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; ++i) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
        t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xdd);
        t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
        t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xdd);
    }
    for (int i = 0; i < 4; ++i) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
        r[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
        r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
        r[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xdd);
    }
}

// Output rows [r0, r1) of image n for panels [p0, p0 + NB): tiles into the thread's buffer
// ([positions][32]), then the valid (or pooled) positions 16 at a time into the output.
// Flat (stride 1 only): the tiles run along the flattened padded image (over the border
// columns, whose results are dropped), the tile buffer's row of output (row, col) is
// (row - r0) * Wp + col. Otherwise each output row is tiled on its own: (row - r0) * pitch +
// col, pitch = OW rounded up to whole tiles.
template <int P, int NB, int SW>
OC_TARGET void block(const Job &j, const float *xn, i64 n, i64 p0, i64 r0, i64 r1, bool flat) {
    const Geometry &g = j.g;
    const i64 wp = g.wp();
    const i64 pitch = flat ? wp : (g.ow + P - 1) / P * P;
    const i64 rows_t = flat ? (r1 - 1 - r0) * wp + g.ow : (r1 - r0) * pitch;  // tile rows used
    float *t = scratch((std::size_t) ((rows_t + P) * NB * kLanes), 1);
    const float *w = j.w + p0 * j.k * kLanes, *bias = j.bias.data() + p0 * kLanes;
    // the reduction in ranges whose weights (NB panels x kKc x 64 bytes: 16 KiB) stay in L1
    // across the chunk's tiles, instead of streaming all K from L2 for every tile
    for (i64 k0 = 0; k0 < j.k; k0 += kKc) {
        const i64 k1 = std::min(j.k, k0 + kKc);
        const bool first = k0 == 0, last = k1 == j.k;
        if (flat)
            for (i64 q = 0; q < rows_t; q += P)
                tile<P, NB, SW>(j, xn + r0 * wp + q, w, bias, t + q * NB * kLanes, k0, k1, first,
                                last);
        else
            for (i64 row = r0; row < r1; ++row)
                for (i64 col = 0; col < g.ow; col += P)
                    tile<P, NB, SW>(j, xn + row * g.sh * wp + col * SW, w, bias,
                                    t + ((row - r0) * pitch + col) * NB * kLanes, k0, k1, first,
                                    last);
    }
    if (j.pool && !j.act_vector)  // the activation before the pool
        for (i64 q = 0; q < rows_t; ++q) finish_row(t + q * NB * kLanes, NB * kLanes, 0.f, nullptr, j.act);

    // the output positions of this chunk are contiguous in each output plane
    const bool pooled = j.pool != 0;
    const i64 ow = pooled ? g.ow / 2 : g.ow, oh = pooled ? g.oh / 2 : g.oh;
    const i64 row0 = pooled ? r0 / 2 : r0, row1 = std::min(oh, pooled ? r1 / 2 : r1);
    if (row1 <= row0) return;
    const i64 count = (row1 - row0) * ow, plane_out = oh * ow, at0 = row0 * ow;
    const __m512 quarter = _mm512_set1_ps(0.25f);
    i64 row = row0, col = 0;  // of position i0 (no division per position: 64-bit idiv is slow)
    for (i64 i0 = 0; i0 < count; i0 += 16) {
        const int valid = (int) std::min<i64>(16, count - i0);
        const __mmask16 mask = (__mmask16) ((1u << valid) - 1);
        i64 src[16];  // the tile row of each position (the pool's top-left one)
        for (int i = 0; i < valid; ++i) {
            src[i] = pooled ? (2 * row - r0) * pitch + 2 * col : (row - r0) * pitch + col;
            if (++col == ow) col = 0, ++row;
        }
        for (int i = valid; i < 16; ++i) src[i] = src[valid - 1];
#pragma GCC unroll 2
        for (int nb = 0; nb < NB; ++nb) {
            __m512 r[16];
            for (int i = 0; i < 16; ++i) {
                const float *a = t + src[i] * NB * kLanes + nb * kLanes;
                if (!pooled) {
                    r[i] = _mm512_loadu_ps(a);
                    continue;
                }
                const float *b = a + pitch * NB * kLanes;
                const __m512 a0 = _mm512_loadu_ps(a), a1 = _mm512_loadu_ps(a + NB * kLanes),
                             b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + NB * kLanes);
                if (j.pool == 1) {
                    r[i] = max_nan(max_nan(a0, a1), max_nan(b0, b1));
                } else {
                    r[i] = _mm512_mul_ps(_mm512_add_ps(_mm512_add_ps(a0, a1),
                                                       _mm512_add_ps(b0, b1)), quarter);
                }
            }
            transpose16(r);
            const i64 m0 = (p0 + nb) * kLanes;
            const int channels = (int) std::min<i64>(kLanes, g.m - m0);
            for (int mm = 0; mm < channels; ++mm) {
                const i64 at = (n * g.m + m0 + mm) * plane_out + at0 + i0;
                __m512 v = r[mm];
                if (!j.act_in_tile) {
                    if (j.residual)
                        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, j.residual + at));
                    if (j.act_vector) v = act16(v, j.act);
                }
                _mm512_mask_storeu_ps(j.y + at, mask, v);
                if (!j.act_vector && !pooled) finish_row(j.y + at, valid, 0.f, nullptr, j.act);
            }
        }
    }
}

using block_fn = void (*)(const Job &, const float *, i64, i64, i64, i64, bool);

// The tiling of a chunk that costs the least: along the flattened image or row by row, and the
// tile width (each tile's overrun is computed and dropped); the widest tile among equals. Two panels: 4 to 14 positions (8 to 28 accumulators: 8 cover the FMA latency, and the
// loads stay below the FMAs: 2 + P per 2P); one panel: 12 to 28.
template <int SW>
OC_TARGET void run_stride(const Job &j, const float *xn, i64 n, i64 p0, i64 r0, i64 r1) {
    static constexpr block_fn two[] = {
        block<14, 2, SW>, block<13, 2, SW>, block<12, 2, SW>, block<11, 2, SW>, block<10, 2, SW>,
        block<9, 2, SW>, block<8, 2, SW>, block<7, 2, SW>, block<6, 2, SW>, block<5, 2, SW>,
        block<4, 2, SW>};
    static constexpr int two_p[] = {14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4};
    static constexpr block_fn one[] = {block<28, 1, SW>, block<24, 1, SW>, block<20, 1, SW>,
                                       block<16, 1, SW>, block<14, 1, SW>, block<12, 1, SW>};
    static constexpr int one_p[] = {28, 24, 20, 16, 14, 12};
    const bool pair = j.panels - p0 >= 2;
    const int *widths = pair ? two_p : one_p;
    const int count = pair ? 11 : 6;
    const bool can_flat = SW == 1 && j.g.sh == 1;
    const i64 run = (r1 - 1 - r0) * j.g.wp() + j.g.ow, rows = r1 - r0;
    int best = 0;
    bool flat = false;
    i64 least = -1;
    // a tile's cost in half cycles: K * P * NB FMAs on two ports, its P * NB results stored with
    // the bias and activation (~2 cycles each), ~50 cycles around it (estimated)
    const i64 nb = pair ? 2 : 1, per_position = (j.k + 4) * nb;
    for (int i = 0; i < count; ++i) {
        const i64 p = widths[i], tile = p * per_position + 100;
        const i64 by_row = rows * ((j.g.ow + p - 1) / p) * tile;
        const i64 by_flat = can_flat ? (run + p - 1) / p * tile : by_row + 1;
        const i64 cost = std::min(by_row, by_flat);
        if (least < 0 || cost < least) least = cost, best = i, flat = by_flat < by_row;
    }
    (pair ? two : one)[best](j, xn, n, p0, r0, r1, flat);
}

OC_TARGET void run(const Job &j, const float *xn, i64 n, i64 p0, i64 r0, i64 r1) {
    if (j.g.sw == 1)
        run_stride<1>(j, xn, n, p0, r0, r1);
    else
        run_stride<2>(j, xn, n, p0, r0, r1);
}

}  // namespace oc

// xp[n, c] = the image with its zero border, for images [n0, n1).
void pad_images(const float *x, float *xp, const Geometry &g, std::int64_t plane,
                std::int64_t n0, std::int64_t n1) {
    const std::int64_t wp = g.wp();
    for (std::int64_t n = n0; n < n1; ++n)
        for (std::int64_t ch = 0; ch < g.c; ++ch) {
            float *dst = xp + (n * g.c + ch) * plane;
            const float *src = x + (n * g.c + ch) * g.h * g.w;
            std::fill(dst, dst + g.pt * wp, 0.f);
            for (std::int64_t r = 0; r < g.h; ++r) {
                float *d = dst + (g.pt + r) * wp;
                std::fill(d, d + g.pl, 0.f);
                std::memcpy(d + g.pl, src + r * g.w, (std::size_t) g.w * sizeof(float));
                std::fill(d + g.pl + g.w, d + wp, 0.f);
            }
            std::fill(dst + (g.pt + g.h) * wp, dst + plane, 0.f);
        }
}

void conv_direct(In x, In wpk, std::optional<In> bias, std::optional<In> residual, Out y,
                 std::int64_t m, std::vector<std::int64_t> pads, std::vector<std::int64_t> dil,
                 int act, float alpha, float lo, float hi, int pooling,
                 std::vector<std::int64_t> strides) {
    const char *fn = "conv_direct";
    const std::int64_t lanes = wpk.ndim() == 5 ? (std::int64_t) wpk.shape(4) : 0;
    OFFLOAD_CHECK(lanes == kMB || lanes == oc::kLanes,
          std::string(fn) + ": packed weights must be [ceil(M/8), C, kh, kw, 8] or [ceil(M/16), "
                            "C, kh, kw, 16], got " + shape_of(wpk));
    OFFLOAD_CHECK(lanes == kMB || offload::gemm::has_avx512(),
          std::string(fn) + ": weights packed in 16 lanes need AVX-512, which this CPU lacks");
    OFFLOAD_CHECK(m >= 1 && (std::int64_t) wpk.shape(0) == (m + lanes - 1) / lanes,
          std::string(fn) + ": packed weights hold " + std::to_string(wpk.shape(0)) +
              " blocks of " + std::to_string(lanes) + " output channels, M = " +
              std::to_string(m) + " needs " + std::to_string((m + lanes - 1) / lanes));
    OFFLOAD_CHECK(pooling >= 0 && pooling <= 2, std::string(fn) + ": pool must be 0 (none), 1 (max 2x2) "
                                                          "or 2 (average 2x2), got " +
                                                          std::to_string(pooling));
    OFFLOAD_CHECK(!pooling || !residual, std::string(fn) + ": a residual cannot be added before a fused pool");
    OFFLOAD_CHECK(strides.size() == 2 && strides[0] >= 1 && strides[0] <= (1 << 20) &&
              (strides[1] == 1 || strides[1] == 2),
          std::string(fn) + ": strides must be [1 to 2**20, 1 or 2]");
    OFFLOAD_CHECK(lanes == oc::kLanes || (strides[0] == 1 && strides[1] == 1),
          std::string(fn) + ": weights packed in 8 lanes take stride 1 only, got strides [" +
              std::to_string(strides[0]) + ", " + std::to_string(strides[1]) + "]");
    const Geometry g = geometry(fn, x, y, m, (std::int64_t) wpk.shape(1),
                                (std::int64_t) wpk.shape(2), (std::int64_t) wpk.shape(3),
                                strides, pads, dil, pooling != 0);
    check_epilogue_args(fn, y, m, bias, residual);
    const Act a = make_act(fn, act, alpha, lo, hi);
    check_apart(fn, "x", y, x);
    check_apart(fn, "w", y, wpk);

    const DirectKernel &k = direct_kernel();
    const bool in_lanes = lanes == oc::kLanes;
    DirectJob j;
    oc::Job o;
    j.g = o.g = g;
    j.plane = o.plane = g.hp() * g.wp();
    j.w = o.w = wpk.data();
    j.bias = bias ? bias->data() : nullptr;
    j.residual = o.residual = residual ? residual->data() : nullptr;
    j.y = o.y = y.data();
    j.act = o.act = a;
    j.pool = o.pool = pooling;
    for (std::int64_t i = 0; i < g.kh; ++i)
        for (std::int64_t t = 0; t < g.kw; ++t) j.offs.push_back(i * g.dh * g.wp() + t * g.dw);
    if (in_lanes) {
        o.panels = (m + oc::kLanes - 1) / oc::kLanes;
        o.k = g.c * g.kh * g.kw;
        o.bias.assign((std::size_t) (o.panels * oc::kLanes), 0.f);
        if (bias) std::copy(bias->data(), bias->data() + m, o.bias.begin());
        o.koff.reserve((std::size_t) o.k);
        for (std::int64_t ch = 0; ch < g.c; ++ch)
            for (std::int64_t off : j.offs) o.koff.push_back(ch * o.plane + off);
        o.act_vector = a.code != kSigmoid && a.code != kTanh;
        o.act_in_tile = o.act_vector && !residual;
    }
    if (g.n == 0 || g.oh == 0 || g.ow == 0) return;
    // the last tile reads up to a tile width and the largest tap offset past the last plane
    const std::int64_t slack = std::max<std::int64_t>(k.width, 2 * 28) + j.offs.back() + 16;
    // channel blocks: 8 channels (positions in the vectors), or two panels of 16
    const std::int64_t blocks = in_lanes ? (o.panels + 1) / 2 : (m + kMB - 1) / kMB;
    const std::int64_t macs = g.n * m * g.c * g.kh * g.kw * g.oh * g.ow;
    const bool parallel = macs >= g_parallel_macs;
    std::int64_t rows;
    if (in_lanes) {  // a tile buffer of ~256 positions x 32 channels (32 KiB: stays in L1)
        rows = std::clamp<std::int64_t>(256 / g.wp(), 1, g.oh);
    } else {
        const std::int64_t per_row = kMB * g.wp() * g.c * g.kh * g.kw;
        rows = std::clamp<std::int64_t>((1 << 16) / std::max<std::int64_t>(1, per_row), 1, g.oh);
    }
    const int threads = pool().threads();
    if (parallel && g.n < 2 * threads) {  // at least two tasks per thread: split the rows further
        const std::int64_t want = (2 * threads + g.n * blocks - 1) / (g.n * blocks);
        rows = std::min(rows, std::max<std::int64_t>(1, (g.oh + want - 1) / want));
    }
    if (pooling) rows = std::max<std::int64_t>(2, rows / 2 * 2);  // whole pairs of rows per chunk
    const std::int64_t chunks = (g.oh + rows - 1) / rows;
    const std::int64_t image = g.c * j.plane;
    auto compute = [&](const float *xn, std::int64_t n, std::int64_t mb, std::int64_t ch) {
        const std::int64_t r0 = ch * rows, r1 = std::min(g.oh, (ch + 1) * rows);
        if (in_lanes)
            oc::run(o, xn, n, 2 * mb, r0, r1);
        else
            k.fn(j, xn, n, mb, r0, r1);
    };
    const float *xd = x.data();
    nb::gil_scoped_release release;
    offload::FlushDenormals ftz;
    // (channel blocks outermost for all images, so that large weights are read once per block,
    // measured slower: 88 vs 118 GFLOP/s for a 2048->512 1x1 at 7x7, b8, the same for 3x3)
    if (g.n >= 2 * threads || !parallel) {
        // one image per task, padded into the task thread's scratch (stays in its cache)
        pool().run(g.n, [&](std::int64_t n) {
            float *xp = scratch((std::size_t) (image + slack), 0);
            std::fill(xp + image, xp + image + slack, 0.f);
            pad_images(xd + n * g.c * g.h * g.w, xp, g, j.plane, 0, 1);
            for (std::int64_t mb = 0; mb < blocks; ++mb)
                for (std::int64_t ch = 0; ch < chunks; ++ch) compute(xp, n, mb, ch);
        }, parallel);
        return;
    }
    // few images: all padded first, then tasks of (image, channel block, rows of output)
    float *xp = scratch((std::size_t) (g.n * image + slack), 0);
    std::fill(xp + g.n * image, xp + g.n * image + slack, 0.f);
    pool().run(g.n, [&](std::int64_t n) { pad_images(xd, xp, g, j.plane, n, n + 1); }, parallel);
    pool().run(g.n * blocks * chunks, [&](std::int64_t i) {
        const std::int64_t ch = i % chunks, mb = (i / chunks) % blocks, n = i / (chunks * blocks);
        compute(xp + n * image, n, mb, ch);
    }, parallel);
}

// ---------------------------------------------------------------------------------------------
// Convolution as im2col + SGEMM per image (groups 1).

// cols[(c*kh + i)*kw + j, (oy - oy0)*OW + ow] = x[c, oy*sh + i*dh - pt, ow*sw + j*dw - pl]
// (0 outside) for the output rows [oy0, oy1): the columns of one slab of output positions.
void im2col(const float *x, float *cols, const Geometry &g, std::int64_t oy0, std::int64_t oy1) {
    const std::int64_t taps = g.kh * g.kw, ckk = g.c * taps, ld = (oy1 - oy0) * g.ow;
    for (std::int64_t r = 0; r < ckk; ++r) {
        const std::int64_t ch = r / taps, i = (r % taps) / g.kw, t = r % g.kw;
        const float *xc = x + ch * g.h * g.w;
        float *dst = cols + r * ld;
        const std::int64_t off = t * g.dw - g.pl;  // ix = ox*sw + off
        // valid ox: 0 <= ox*sw + off < W
        std::int64_t lo = off >= 0 ? 0 : (-off + g.sw - 1) / g.sw;
        std::int64_t hi = g.w - off > 0 ? (g.w - off + g.sw - 1) / g.sw : 0;
        lo = std::min(lo, g.ow);
        hi = std::clamp(hi, lo, g.ow);
        for (std::int64_t oy = oy0; oy < oy1; ++oy) {
            float *d = dst + (oy - oy0) * g.ow;
            const std::int64_t iy = oy * g.sh + i * g.dh - g.pt;
            if (iy < 0 || iy >= g.h) {
                std::fill(d, d + g.ow, 0.f);
                continue;
            }
            const float *src = xc + iy * g.w;
            std::fill(d, d + lo, 0.f);
            if (g.sw == 1)
                std::memcpy(d + lo, src + lo + off, (std::size_t) (hi - lo) * sizeof(float));
            else
                for (std::int64_t ox = lo; ox < hi; ++ox) d[ox] = src[ox * g.sw + off];
            std::fill(d + hi, d + g.ow, 0.f);
        }
    }
}

// The columns of one task (C*kh*kw rows by a slab of output positions) stay within this many
// floats (1 MiB: the L2 cache of one core, with the weights' panel beside it).
constexpr std::int64_t kSlabFloats = 1 << 18;

void conv_gemm(In x, In w2, std::optional<In> bias, std::optional<In> residual, Out y,
               std::int64_t kh, std::int64_t kw, std::vector<std::int64_t> strides,
               std::vector<std::int64_t> pads, std::vector<std::int64_t> dil, int act,
               float alpha, float lo, float hi) {
    const char *fn = "conv_gemm";
    OFFLOAD_CHECK(blas_ready(), "conv_gemm: no BLAS loaded (blas_load() found no SGEMM)");
    OFFLOAD_CHECK(w2.ndim() == 2, std::string(fn) + ": weights must be [M, C*kh*kw], got " + shape_of(w2));
    OFFLOAD_CHECK(kh >= 1 && kw >= 1 && kh <= (1 << 20) && kw <= (1 << 20),
          std::string(fn) + ": kernel sizes must be 1 to 2**20");
    const std::int64_t m = (std::int64_t) w2.shape(0), ckk = (std::int64_t) w2.shape(1);
    OFFLOAD_CHECK(x.ndim() == 4 && ckk == (std::int64_t) x.shape(1) * kh * kw,
          std::string(fn) + ": weights [" + std::to_string(m) + ", " + std::to_string(ckk) +
              "] do not fit x " + shape_of(x) + " with a " + std::to_string(kh) + "x" +
              std::to_string(kw) + " kernel");
    const Geometry g = geometry(fn, x, y, m, (std::int64_t) x.shape(1), kh, kw, strides, pads, dil);
    check_epilogue_args(fn, y, m, bias, residual);
    const Act a = make_act(fn, act, alpha, lo, hi);
    check_apart(fn, "x", y, x);
    check_apart(fn, "w", y, w2);
    const std::int64_t ohw = g.oh * g.ow, chw = g.c * g.h * g.w;
    if (g.n == 0 || ohw == 0 || m == 0) return;
    const bool direct_cols = kh == 1 && kw == 1 && g.sh == 1 && g.sw == 1 && !g.pt && !g.pl &&
                             !g.pb && !g.pr;
    const float *xd = x.data(), *wd = w2.data(), *bd = bias ? bias->data() : nullptr;
    const float *rd = residual ? residual->data() : nullptr;
    float *yd = y.data();
    const std::int64_t macs = g.n * m * ckk * ohw;
    const bool parallel = macs >= g_parallel_macs;
    const std::int64_t threads = pool().threads();
    // Tasks of (image, slab of output rows, block of output channels). Each builds the im2col
    // columns of its slab in its own thread's scratch, where they stay in cache, and multiplies
    // them: no image-sized column buffer, and each product packs only its own columns (a split
    // by output channels alone packed every column once per block). Channel blocks only when
    // images x slabs leave threads idle (late layers at batch 1: 7x7 positions, 512 channels).
    const std::int64_t slab_rows = std::clamp<std::int64_t>(
        kSlabFloats / std::max<std::int64_t>(1, ckk * g.ow), 1, g.oh);
    const std::int64_t slabs = (g.oh + slab_rows - 1) / slab_rows, base = g.n * slabs;
    std::int64_t mrows = m;
    if (parallel && threads > 1 && base < 2 * threads) {
        const std::int64_t want = (2 * threads + base - 1) / base;
        mrows = std::max<std::int64_t>(16, ((m + want - 1) / want + 7) / 8 * 8);
    }
    const std::int64_t mblocks = (m + mrows - 1) / mrows;
    nb::gil_scoped_release release;
    offload::FlushDenormals ftz;
    BlasSingleThread single;
    pool().run(base * mblocks, [&](std::int64_t i) {
        const std::int64_t mb = i % mblocks, s = (i / mblocks) % slabs, n = i / (mblocks * slabs);
        const std::int64_t oy0 = s * slab_rows, oy1 = std::min(g.oh, oy0 + slab_rows);
        const std::int64_t p0 = oy0 * g.ow, width = (oy1 - oy0) * g.ow;
        const std::int64_t m0 = mb * mrows, m1 = std::min(m, m0 + mrows);
        const float *cols = xd + n * chw + p0;
        std::int64_t ldb = ohw;
        if (!direct_cols) {
            float *c = scratch((std::size_t) (ckk * width), 1);
            im2col(xd + n * chw, c, g, oy0, oy1);
            cols = c;
            ldb = width;
        }
        float *yn = yd + n * m * ohw + p0;
        sgemm(m1 - m0, width, ckk, wd + m0 * ckk, ckk, cols, ldb, yn + m0 * ohw, ohw);
        if (bd || rd || a.code != kIdentity)
            for (std::int64_t mm = m0; mm < m1; ++mm) {
                const std::int64_t at = (n * m + mm) * ohw + p0;
                finish_row(yd + at, width, bd ? bd[mm] : 0.f, rd ? rd + at : nullptr, a);
            }
    }, parallel);
}

// y[r, n] = act(x[r, k] @ w[k, n] + bias[n] + residual[r, n]), rows split over the pool.
void gemm_dense(In x, In w, std::optional<In> bias, std::optional<In> residual, Out y, int act,
                float alpha, float lo, float hi) {
    const char *fn = "gemm_dense";
    OFFLOAD_CHECK(blas_ready(), "gemm_dense: no BLAS loaded (blas_load() found no SGEMM)");
    OFFLOAD_CHECK(x.ndim() == 2 && w.ndim() == 2 && y.ndim() == 2,
          "gemm_dense: expected 2-D x, w and out, got x " + shape_of(x) + ", w " + shape_of(w) +
              ", out " + shape_of(y));
    const std::int64_t rows = x.shape(0), k = x.shape(1), n = w.shape(1);
    OFFLOAD_CHECK((std::int64_t) w.shape(0) == k && (std::int64_t) y.shape(0) == rows &&
              (std::int64_t) y.shape(1) == n,
          "gemm_dense: x " + shape_of(x) + " @ w " + shape_of(w) + " does not fit out " + shape_of(y));
    check_epilogue_args(fn, y, n, bias, residual);
    const Act a = make_act(fn, act, alpha, lo, hi);
    check_apart(fn, "x", y, x);
    check_apart(fn, "w", y, w);
    if (rows == 0 || n == 0) return;
    const float *xd = x.data(), *wd = w.data(), *bd = bias ? bias->data() : nullptr;
    const float *rd = residual ? residual->data() : nullptr;
    float *yd = y.data();
    const bool parallel = rows * k * n >= g_parallel_macs;
    const int threads = pool().threads();
    const std::int64_t parts = parallel ? 4 * threads : 1;
    const std::int64_t step = std::max<std::int64_t>(16, (rows + parts - 1) / parts);
    nb::gil_scoped_release release;
    offload::FlushDenormals ftz;
    BlasSingleThread single;
    pool().run((rows + step - 1) / step, [&](std::int64_t i) {
        const std::int64_t r0 = i * step, r1 = std::min(rows, r0 + step);
        sgemm(r1 - r0, n, k, xd + r0 * k, k, wd, n, yd + r0 * n, n);
        if (bd || rd || a.code != kIdentity)
            for (std::int64_t r = r0; r < r1; ++r) {
                float *o = yd + r * n;
                if (bd) for (std::int64_t j = 0; j < n; ++j) o[j] += bd[j];
                finish_row(o, n, 0.f, rd ? rd + r * n : nullptr, a);
            }
    }, parallel);
}

// ---------------------------------------------------------------------------------------------
// Pooling without padding (every window inside the image): max or mean over kh x kw taps.

CONV_CLONES
void pool_plane(const float *x, float *y, std::int64_t h, std::int64_t w, std::int64_t oh,
                std::int64_t ow, std::int64_t kh, std::int64_t kw, std::int64_t sh,
                std::int64_t sw, std::int64_t dh, std::int64_t dw, bool is_max) {
    const float scale = 1.f / (float) (kh * kw);
    (void) h;
    for (std::int64_t oy = 0; oy < oh; ++oy) {
        float *o = y + oy * ow;
        for (std::int64_t i = 0; i < kh; ++i) {
            const float *src = x + (oy * sh + i * dh) * w;
            for (std::int64_t t = 0; t < kw; ++t) {
                const float *s0 = src + t * dw;
                if (i == 0 && t == 0) {
                    if (sw == 1) for (std::int64_t ox = 0; ox < ow; ++ox) o[ox] = s0[ox];
                    else if (sw == 2) for (std::int64_t ox = 0; ox < ow; ++ox) o[ox] = s0[2 * ox];
                    else for (std::int64_t ox = 0; ox < ow; ++ox) o[ox] = s0[ox * sw];
                } else if (is_max) {
                    // NaN propagates as NumPy's maximum does
                    for (std::int64_t ox = 0; ox < ow; ++ox) {
                        const float v = s0[ox * sw];
                        o[ox] = (v > o[ox] || v != v) ? v : o[ox];
                    }
                } else {
                    for (std::int64_t ox = 0; ox < ow; ++ox) o[ox] += s0[ox * sw];
                }
            }
        }
        if (!is_max)
            for (std::int64_t ox = 0; ox < ow; ++ox) o[ox] *= scale;
    }
}

void pool2d(In x, Out y, bool is_max, std::vector<std::int64_t> kernel,
            std::vector<std::int64_t> strides, std::vector<std::int64_t> dil) {
    const char *fn = "pool2d";
    OFFLOAD_CHECK(kernel.size() == 2 && kernel[0] >= 1 && kernel[1] >= 1 && kernel[0] <= (1 << 20) &&
              kernel[1] <= (1 << 20),
          "pool2d: kernel must be 2 sizes from 1 to 2**20");
    const Geometry g = geometry(fn, x, y, (std::int64_t) x.shape(1), (std::int64_t) x.shape(1),
                                kernel[0], kernel[1], strides, {0, 0, 0, 0}, dil);
    check_apart(fn, "x", y, x);
    const float *xd = x.data();
    float *yd = y.data();
    const std::int64_t planes = g.n * g.c, hw = g.h * g.w, ohw = g.oh * g.ow;
    if (!planes || !ohw) return;
    const bool parallel = planes * ohw * g.kh * g.kw >= g_parallel_macs.load();
    const std::int64_t step = std::max<std::int64_t>(1, (1 << 15) / std::max<std::int64_t>(1, ohw * g.kh * g.kw));
    nb::gil_scoped_release release;
    offload::FlushDenormals ftz;
    pool().run((planes + step - 1) / step, [&](std::int64_t i) {
        for (std::int64_t p = i * step; p < std::min(planes, (i + 1) * step); ++p)
            pool_plane(xd + p * hw, yd + p * ohw, g.h, g.w, g.oh, g.ow, g.kh, g.kw, g.sh, g.sw,
                       g.dh, g.dw, is_max);
    }, parallel);
}

// ---------------------------------------------------------------------------------------------
// Dense layers with constant weights: the packed-panel product of gemm.h (the LSTM's), rows in
// register blocks, the bias folded into the product and the residual and activation applied to
// each block while it is in cache. Narrow layers (the HEP MLPs, ParT's projections: 16 to ~512
// columns) are where OpenBLAS's per-call packing and the separate epilogue pass lose.

struct DenseJob {
    const float *x, *wp, *bias, *residual;  // bias: npad values (zeros past n)
    float *y;
    std::int64_t k, n, npad;
    Act act;
};

template <typename V>
__attribute__((always_inline)) inline void dense_rows_packed(const DenseJob &j, std::int64_t r0,
                                                             std::int64_t r1) {
    using namespace offload::gemm;
    constexpr int MR = Tile<V>::MR;
    float *tile = scratch((std::size_t) (MR * j.npad), 0);
    for (std::int64_t r = r0; r < r1; r += MR) {
        const int mr = (int) std::min<std::int64_t>(MR, r1 - r);
        gemm_rows<V>(mr, Operands{j.x + r * j.k, j.k, j.wp, j.k}, Operands{nullptr, 0, nullptr, 0},
                     j.npad, j.bias, tile, j.npad);
        for (int i = 0; i < mr; ++i) {
            float *o = j.y + (r + i) * j.n;
            std::memcpy(o, tile + i * j.npad, (std::size_t) j.n * sizeof(float));
            if (j.residual || j.act.code != kIdentity)
                finish_row(o, j.n, 0.f, j.residual ? j.residual + (r + i) * j.n : nullptr, j.act);
        }
    }
}

__attribute__((target("avx512f,avx512vl,avx512dq,fma,avx2")))
void dense_packed_avx512(const DenseJob &j, std::int64_t r0, std::int64_t r1) {
    dense_rows_packed<offload::gemm::v16>(j, r0, r1);
}
CONV_CLONES void dense_packed_v8(const DenseJob &j, std::int64_t r0, std::int64_t r1) {
    dense_rows_packed<offload::gemm::v8>(j, r0, r1);
}

// y[r, :] = act(x[r, :] @ w + bias + residual[r, :]) with w packed [npad / 16, k, 16] (the
// columns of w in panels of 16, zeros past n).
void dense_packed(In x, In wp, std::optional<In> bias, std::optional<In> residual, Out y, int act,
                  float alpha, float lo, float hi) {
    const char *fn = "dense_packed";
    using offload::gemm::kNR;
    OFFLOAD_CHECK(x.ndim() == 2 && y.ndim() == 2 && wp.ndim() == 3 && wp.shape(2) == (size_t) kNR,
          "dense_packed: expected x [rows, k], w packed [npad / 16, k, 16], out [rows, n]; got x " +
              shape_of(x) + ", w " + shape_of(wp) + ", out " + shape_of(y));
    const std::int64_t rows = x.shape(0), k = x.shape(1), n = y.shape(1);
    const std::int64_t npad = (std::int64_t) wp.shape(0) * kNR;
    OFFLOAD_CHECK((std::int64_t) wp.shape(1) == k && (std::int64_t) y.shape(0) == rows && n <= npad &&
              npad - n < kNR,
          "dense_packed: x " + shape_of(x) + " @ w packed " + shape_of(wp) + " does not fit out " +
              shape_of(y));
    check_epilogue_args(fn, y, n, bias, residual);
    OFFLOAD_CHECK(product({rows, k, npad}) >= 0, "dense_packed: sizes too large");
    const Act a = make_act(fn, act, alpha, lo, hi);
    check_apart(fn, "x", y, x);
    check_apart(fn, "w", y, wp);
    if (rows == 0 || n == 0) return;
    std::vector<float> b(npad, 0.f);
    if (bias) std::copy(bias->data(), bias->data() + n, b.begin());
    const DenseJob j{x.data(), wp.data(), b.data(), residual ? residual->data() : nullptr, y.data(),
                     k, n, npad, a};
    auto *run = offload::gemm::has_avx512() ? dense_packed_avx512 : dense_packed_v8;
    const bool parallel = rows * k * n >= g_parallel_macs;
    const std::int64_t parts = parallel ? 4 * pool().threads() : 1;
    const std::int64_t step = std::max<std::int64_t>(24, ((rows + parts - 1) / parts + 23) / 24 * 24);
    nb::gil_scoped_release release;
    offload::FlushDenormals ftz;
    pool().run((rows + step - 1) / step, [&](std::int64_t i) {
        run(j, i * step, std::min(rows, (i + 1) * step));
    }, parallel);
}

// out[i] = a[i] @ b[i or 0] for i in [0, B): a [B, M, K], b [B or 1, K, N], out [B, M, N]
// (attention's batched products of two run-time tensors), products shared out over the pool.
void matmul_batched(In a, In b, Out y) {
    const char *fn = "matmul_batched";
    OFFLOAD_CHECK(blas_ready(), "matmul_batched: no BLAS loaded (blas_load() found no SGEMM)");
    OFFLOAD_CHECK(a.ndim() == 3 && b.ndim() == 3 && y.ndim() == 3,
          "matmul_batched: expected a [B, M, K], b [B or 1, K, N], out [B, M, N], got a " +
              shape_of(a) + ", b " + shape_of(b) + ", out " + shape_of(y));
    const std::int64_t nb_ = (std::int64_t) a.shape(0), m = a.shape(1), k = a.shape(2),
                       n = b.shape(2), bb = b.shape(0);
    OFFLOAD_CHECK((std::int64_t) b.shape(1) == k && (bb == nb_ || bb == 1) &&
              (std::int64_t) y.shape(0) == nb_ && (std::int64_t) y.shape(1) == m &&
              (std::int64_t) y.shape(2) == n,
          "matmul_batched: a " + shape_of(a) + " @ b " + shape_of(b) + " does not fit out " +
              shape_of(y));
    OFFLOAD_CHECK(product({nb_, m, k, n}) >= 0, "matmul_batched: sizes too large");
    check_apart(fn, "a", y, a);
    check_apart(fn, "b", y, b);
    if (nb_ == 0 || m == 0 || n == 0) return;
    const float *ad = a.data(), *bd = b.data();
    float *yd = y.data();
    const std::int64_t per = std::max<std::int64_t>(1, (1 << 16) / std::max<std::int64_t>(1, m * k * n));
    const bool parallel = nb_ * m * k * n >= g_parallel_macs;
    nb::gil_scoped_release release;
    offload::FlushDenormals ftz;
    BlasSingleThread single;
    pool().run((nb_ + per - 1) / per, [&](std::int64_t t) {
        for (std::int64_t i = t * per; i < std::min(nb_, (t + 1) * per); ++i)
            sgemm(m, n, k, ad + i * m * k, k, bd + (bb == 1 ? 0 : i) * k * n, n,
                  yd + i * m * n, n);
    }, parallel);
}

}  // namespace

namespace offload {
void parallel_for(std::int64_t count, const std::function<void(std::int64_t)> &fn,
                  bool parallel) {
    pool().run(count, fn, parallel);
}
int pool_threads() { return pool().threads(); }
std::int64_t parallel_macs() { return g_parallel_macs.load(); }
}  // namespace offload

void register_conv_kernels(nb::module_ &m) {
    m.def("set_num_threads", [](int n) {
              OFFLOAD_CHECK(n >= 1 && n <= 4096, "set_num_threads: expected 1 to 4096 threads, got " +
                                             std::to_string(n));
              nb::gil_scoped_release release;
              pool().resize(n);
          }, nb::arg("n"), "Size the pool of the CPU device's kernels: n threads, the caller included.");
    m.def("get_num_threads", [] { return pool().threads(); });
    m.def("set_parallel_macs", [](std::int64_t macs) {
              OFFLOAD_CHECK(macs >= 0, "set_parallel_macs: expected >= 0");
              g_parallel_macs = macs;
          }, nb::arg("macs"), "Work below this many multiply-adds runs on the calling thread.");
    m.def("get_parallel_macs", [] { return g_parallel_macs.load(); });
    m.def("blas_load", &blas_load, nb::arg("path"),
          "Use the SGEMM (and OpenBLAS thread control) of the already-loaded library at path; "
          "returns the symbol used, or '' when none fits.");
    m.def("blas_name", [] {
              std::lock_guard<std::mutex> lock(g_blas.mutex);
              return g_blas.name;
          });
    m.def("simd", [] { return std::string(direct_kernel().name); },
          "The direct-convolution kernel this CPU runs: 'avx512', 'avx2' or 'generic'.");
    m.def("conv_direct", &conv_direct, nb::arg("x"), nb::arg("w_packed"), nb::arg("bias").none(),
          nb::arg("residual").none(), nb::arg("out").noconvert(), nb::arg("m"), nb::arg("pads"),
          nb::arg("dilations"), nb::arg("act"), nb::arg("alpha"), nb::arg("lo"), nb::arg("hi"),
          nb::arg("pool") = 0, nb::arg("strides") = std::vector<std::int64_t>{1, 1},
          "Direct convolution, groups 1: out = act(conv(x, w) + bias + residual); weights "
          "packed [ceil(M/8), C, kh, kw, 8] (stride 1) or, with AVX-512, [ceil(M/16), C, kh, "
          "kw, 16] (strides [any, 1 or 2]), zeros past M. pool 1 / 2: out is that after a "
          "2x2 stride-2 max / average pool (no residual then).");
    m.def("conv_gemm", &conv_gemm, nb::arg("x"), nb::arg("w"), nb::arg("bias").none(),
          nb::arg("residual").none(), nb::arg("out").noconvert(), nb::arg("kh"), nb::arg("kw"),
          nb::arg("strides"), nb::arg("pads"), nb::arg("dilations"), nb::arg("act"),
          nb::arg("alpha"), nb::arg("lo"), nb::arg("hi"),
          "Convolution, groups 1, as im2col + SGEMM per image: w is [M, C*kh*kw].");
    m.def("pool2d", &pool2d, nb::arg("x"), nb::arg("out").noconvert(), nb::arg("is_max"),
          nb::arg("kernel"), nb::arg("strides"), nb::arg("dilations"),
          "Max or average pooling without padding (every window inside x), NCHW float32.");
    m.def("dense_packed", &dense_packed, nb::arg("x"), nb::arg("w_packed"), nb::arg("bias").none(),
          nb::arg("residual").none(), nb::arg("out").noconvert(), nb::arg("act"), nb::arg("alpha"),
          nb::arg("lo"), nb::arg("hi"),
          "out = act(x @ w + bias + residual), w packed [ceil(n / 16), k, 16] (zeros past n); "
          "register-blocked rows on the pool.");
    m.def("matmul_batched", &matmul_batched, nb::arg("a"), nb::arg("b"), nb::arg("out").noconvert(),
          "out[i] = a[i] @ b[i] (or b[0]) for a [B, M, K], b [B or 1, K, N], on the pool.");
    m.def("gemm_dense", &gemm_dense, nb::arg("x"), nb::arg("w"), nb::arg("bias").none(),
          nb::arg("residual").none(), nb::arg("out").noconvert(), nb::arg("act"), nb::arg("alpha"),
          nb::arg("lo"), nb::arg("hi"), "out = act(x @ w + bias + residual) on the pool.");
}
