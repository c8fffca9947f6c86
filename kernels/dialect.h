/* dialect.h: one kernel source for OpenCL C 1.2 and CUDA C++.
 *
 * Kernels use only these macros for what differs between the two languages (after PyOpenCL's
 * _cluda.py): KERNEL, GLOBAL, LOCAL, RESTRICT, BARRIER, DEVICE_FN, GID/LID/GROUP/LSIZE/NGROUPS,
 * the math helpers below, and the tensor storage type `real` with LD/ST (end of file). Indices
 * are int (tensors here stay below 2^31 elements).
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

/* ---------------------------------------------------------------- tensor storage
 * Tensors in global memory have the element type `real`, read with LD(p, i) and written with
 * ST(p, i, v); arithmetic is float. float by default; IEEE half with STORAGE_F16 (OpenCL:
 * vload_half/vstore_half, core OpenCL 1.2, no cl_khr_fp16 needed; CUDA: the cvt instructions);
 * bfloat16 with STORAGE_BF16, held as its 16 raw bits (round to nearest even, NaN kept). */
#ifdef __CUDACC__
#define AS_FLOAT(u) __uint_as_float(u)
#define AS_UINT(f) __float_as_uint(f)
typedef unsigned short bits16;
#else
#define AS_FLOAT(u) as_float(u)
#define AS_UINT(f) as_uint(f)
typedef ushort bits16;
#endif

#if defined(STORAGE_F16)
#ifdef __CUDACC__
typedef unsigned short real;
#ifdef OFFLOAD_CUDA_EMU /* cuda-emu:0 runs this CUDA side on the host (drivers/_cupy_emu): no PTX */
DEVICE_FN float half_to_float(unsigned short h) { return emu_half_to_float(h); }
DEVICE_FN unsigned short float_to_half(float f) { return emu_float_to_half(f); }
#else
DEVICE_FN float half_to_float(unsigned short h)
{
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
DEVICE_FN unsigned short float_to_half(float f)
{
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif
#define LD(p, i) half_to_float((p)[i])
#define ST(p, i, v) ((p)[i] = float_to_half(v))
#else
typedef half real;
#define LD(p, i) vload_half((i), (p))
#define ST(p, i, v) vstore_half_rte((v), (i), (p))
#endif

#elif defined(STORAGE_BF16)
typedef bits16 real;
DEVICE_FN bits16 float_to_bf16(float v)
{
    unsigned int u = AS_UINT(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bits16)((u >> 16) | 0x40u); /* quiet NaN */
    return (bits16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
#define LD(p, i) AS_FLOAT(((unsigned int)(p)[i]) << 16)
#define ST(p, i, v) ((p)[i] = float_to_bf16(v))

#else
typedef float real;
#define LD(p, i) ((p)[i])
#define ST(p, i, v) ((p)[i] = (v))
#endif

/* Integer and bool tensors (indices, masks, shapes): int64 as i64, bool as u8 (0 or 1). */
#ifdef __CUDACC__
typedef long long i64;
typedef unsigned char u8;
#else
typedef long i64;
typedef uchar u8;
#endif

#endif /* OFFLOAD_DIALECT_H */
