/* host.h: what a CUDA kernel of kernels/ needs to compile for the host with g++, for cuda-emu:0.
 *
 * Included before the program source: the program then goes through dialect.h's CUDA side
 * (__CUDACC__ is defined here, as NVRTC defines it) with the CUDA built-ins below. One kernel
 * launch runs its grid one block at a time on the calling thread (the Python side serialises
 * launches, like one GPU running one kernel at a time). A block without barriers runs its threads
 * as a loop; a block of a kernel that calls __syncthreads() runs each thread as a fiber
 * (ucontext), all threads up to the barrier, then all on to the next: barrier phases, with
 * __shared__ memory shared by the block (a static variable: blocks run one after another).
 * Single-precision denormals are flushed on input and output (MXCSR FTZ + DAZ) during a launch,
 * as NVRTC's -ftz=true (which CuPy always passes) makes the GPU do.
 */
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <ucontext.h>
#include <xmmintrin.h>

struct emu_dim3 { unsigned x, y, z; };
static emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __CUDACC__ 1
#define OFFLOAD_CUDA_EMU 1
#define __global__
#define __device__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ static

static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
/* IEEE binary16 <-> binary32, round to nearest even (the cvt.rn.f16.f32 / cvt.f32.f16 PTX). */
static inline float emu_half_to_float(unsigned short h)
{
    _Float16 v; std::memcpy(&v, &h, 2); return (float)v;
}
static inline unsigned short emu_float_to_half(float f)
{
    _Float16 v = (_Float16)f; unsigned short h; std::memcpy(&h, &v, 2); return h;
}

/* ----------------------------------------------------------------------- barriers (fibers) */
namespace emu {
static int fiber_mode = 0;           /* this launch runs blocks as fibers */
static int error = 0;                /* 1: barrier without fibers, 2: divergent barrier */
static ucontext_t scheduler;
static std::vector<ucontext_t> fibers;
static std::vector<char> stacks;
static std::vector<int> state;       /* 0 runnable, 1 waiting at a barrier, 2 returned */
static int current = 0;
static void (*body)(void*) = nullptr;
static void* body_arg = nullptr;
static const size_t STACK = 64 * 1024;

static void barrier()
{
    if (!fiber_mode) { error = 1; return; }
    state[current] = 1;
    swapcontext(&fibers[current], &scheduler);
}

static void trampoline()
{
    body(body_arg);
    state[current] = 2;
    swapcontext(&fibers[current], &scheduler);
}

static void set_thread(int i)
{
    threadIdx.x = i % blockDim.x;
    threadIdx.y = (i / blockDim.x) % blockDim.y;
    threadIdx.z = i / (blockDim.x * blockDim.y);
}

/* One block as fibers: every thread to its next barrier (or its end), then again. */
static int run_block_fibers(int threads)
{
    if ((int)fibers.size() < threads) {
        fibers.resize(threads);
        stacks.resize((size_t)threads * STACK);
        state.resize(threads);
    }
    for (int i = 0; i < threads; ++i) {
        getcontext(&fibers[i]);
        fibers[i].uc_stack.ss_sp = stacks.data() + (size_t)i * STACK;
        fibers[i].uc_stack.ss_size = STACK;
        fibers[i].uc_link = nullptr;
        makecontext(&fibers[i], trampoline, 0);
        state[i] = 0;
    }
    for (;;) {
        for (int i = 0; i < threads; ++i) {
            if (state[i] == 2) continue;
            current = i;
            state[i] = 0;
            set_thread(i);
            swapcontext(&scheduler, &fibers[i]);
        }
        int done = 0, waiting = 0;
        for (int i = 0; i < threads; ++i) (state[i] == 2 ? done : waiting) += 1;
        if (waiting == 0) return 0;
        if (done) return 2; /* some threads returned while others wait: undefined on a GPU */
    }
}

template <class F>
static void trampoline_for(void* f) { (*(F*)f)(); }

/* Run the grid g[3] of blocks b[3]: returns 0, or the error code above. */
template <class F>
static int run_grid(const unsigned* g, const unsigned* b, int fibered, F f)
{
    unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040); /* FTZ | DAZ, as -ftz=true */
    error = 0;
    fiber_mode = fibered;
    gridDim = {g[0], g[1], g[2]};
    blockDim = {b[0], b[1], b[2]};
    const int threads = (int)(b[0] * b[1] * b[2]);
    body = &trampoline_for<F>;
    body_arg = &f;
    for (unsigned bz = 0; bz < g[2] && !error; ++bz)
        for (unsigned by = 0; by < g[1] && !error; ++by)
            for (unsigned bx = 0; bx < g[0] && !error; ++bx) {
                blockIdx = {bx, by, bz};
                if (fibered) {
                    error = run_block_fibers(threads);
                } else {
                    for (unsigned tz = 0; tz < b[2]; ++tz)
                        for (unsigned ty = 0; ty < b[1]; ++ty)
                            for (unsigned tx = 0; tx < b[0]; ++tx) {
                                threadIdx = {tx, ty, tz};
                                f();
                            }
                }
            }
    _mm_setcsr(csr);
    return error;
}
} /* namespace emu */

#define __syncthreads() emu::barrier()
