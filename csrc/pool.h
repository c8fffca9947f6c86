// The CPU device's one thread pool (defined in conv_kernels.cpp), for the other kernel files.
#pragma once

#include <cstdint>
#include <functional>
#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif

namespace offload {

// fn(i) for i in [0, count) on the pool (sized by set_num_threads, the calling thread included;
// idle helpers sleep), or on the calling thread alone when parallel is false, the pool has one
// thread or another caller holds it. Returns when every item is done; std::bad_alloc when an
// item threw.
void parallel_for(std::int64_t count, const std::function<void(std::int64_t)> &fn,
                  bool parallel = true);

// The pool's size (set_num_threads), the calling thread included.
int pool_threads();

// Work below this many multiply-adds runs on the calling thread (set_parallel_macs).
std::int64_t parallel_macs();

// While alive: denormal float32 results are flushed to zero and denormal operands read as zero
// (x86 MXCSR FTZ | DAZ) on this thread; the caller's mode comes back at the end. Every kernel
// entry point and the pool's helpers hold one, as CUDA kernels compiled with -ftz=true and
// TensorFlow's CPU kernels (ScopedFlushDenormal) do: on Intel cores an operation on a denormal
// takes a microcode assist of ~100 cycles, and a saturated LSTM gate (sigmoid -> 1e-39) made a
// DeepJet-sized network 28x slower. Values below 1.2e-38 in magnitude become 0.
class FlushDenormals {
  public:
#if defined(__SSE__) || defined(__x86_64__)
    FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }
    ~FlushDenormals() { _mm_setcsr(saved_); }

  private:
    unsigned saved_;
#else
    FlushDenormals() {}
#endif
    FlushDenormals(const FlushDenormals &) = delete;
    FlushDenormals &operator=(const FlushDenormals &) = delete;
};

}  // namespace offload
