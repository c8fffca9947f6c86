/* dialect.h: one kernel source for OpenCL C 1.2 and CUDA C++.
 *
 * Kernels use only these macros for what differs between the two languages (after PyOpenCL's
 * _cluda.py): KERNEL, GLOBAL, LOCAL, RESTRICT, BARRIER, DEVICE_FN, GID/LID/GROUP/LSIZE/NGROUPS,
 * and the math helpers below. Indices are int (tensors here stay below 2^31 elements).
 */
#ifndef OFFLOAD_DIALECT_H
#define OFFLOAD_DIALECT_H

#ifdef __CUDACC__
/* ---------------------------------------------------------------- CUDA C++ (NVRTC / nvcc) */
#define KERNEL extern "C" __global__
#define GLOBAL
#define LOCAL __shared__
#define RESTRICT __restrict__
#define DEVICE_FN static __device__ __forceinline__
#define BARRIER() __syncthreads()
#define LID(d) ((int)((d) == 0 ? threadIdx.x : (d) == 1 ? threadIdx.y : threadIdx.z))
#define GROUP(d) ((int)((d) == 0 ? blockIdx.x : (d) == 1 ? blockIdx.y : blockIdx.z))
#define LSIZE(d) ((int)((d) == 0 ? blockDim.x : (d) == 1 ? blockDim.y : blockDim.z))
#define NGROUPS(d) ((int)((d) == 0 ? gridDim.x : (d) == 1 ? gridDim.y : gridDim.z))
#define GID(d) (GROUP(d) * LSIZE(d) + LID(d))
#define INF_F __int_as_float(0x7f800000)
#define FMAX(a, b) fmaxf((a), (b))
#define FMIN(a, b) fminf((a), (b))
#define EXP(x) expf(x)
#define TANH(x) tanhf(x)
#define MAD(a, b, c) fmaf((a), (b), (c))
#define UNROLL _Pragma("unroll")

#else
/* ---------------------------------------------------------------- OpenCL C 1.2 */
#define KERNEL __kernel
#define GLOBAL __global
#define LOCAL __local
#define RESTRICT restrict
#define DEVICE_FN static inline
#define BARRIER() barrier(CLK_LOCAL_MEM_FENCE)
#define LID(d) ((int)get_local_id(d))
#define GROUP(d) ((int)get_group_id(d))
#define LSIZE(d) ((int)get_local_size(d))
#define NGROUPS(d) ((int)get_num_groups(d))
#define GID(d) ((int)get_global_id(d))
#define INF_F INFINITY
#define FMAX(a, b) fmax((a), (b))
#define FMIN(a, b) fmin((a), (b))
#define EXP(x) exp(x)
#define TANH(x) tanh(x)
#define MAD(a, b, c) ((a) * (b) + (c)) /* contracted to an FMA with -cl-mad-enable */
#define UNROLL _Pragma("unroll")
#endif

#endif /* OFFLOAD_DIALECT_H */
