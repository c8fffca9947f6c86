// offload HLS kernels: types, memory layout and limits shared by dense.cpp, conv2d.cpp, pool.cpp.
//
// Types are fixed at compile time, by macros or by a generated header:
//   -DDATA_T='ap_fixed<16,6>'   input activations          (default ap_fixed<16,6>)
//   -DWEIGHT_T=...              weights                    (default DATA_T)
//   -DBIAS_T=...                biases                     (default DATA_T)
//   -DACC_T=...                 accumulator                (default ap_fixed<32,12>)
//   -DOUT_T=...                 output activations         (default DATA_T)
// or -DOFFLOAD_USE_TYPES_H with an "offload_types.h" defining those macros on the include path
// (the Makefile writes one, so no commas or angle brackets go through v++ command lines).
//
// Memory layout of every m_axi port: one plain integer per value holding its raw bits
// (value * 2^F), sign-extended for ap_fixed, zero-extended for ap_ufixed, in the smallest of
// 8/16/32/64 bits that holds W (fx_info<T>::store_t; numpy: offload.fpga.quant.FixedType.storage_dtype).
// This equals sizeof(ap_fixed<W,..>) in C-simulation and is explicit on the card, so host,
// C-simulation and device share one layout. The kernels reinterpret the bits with .range(), no
// arithmetic.
//
// Arithmetic (bit-exact with offload.fpga.quant): products at full precision, each converted to ACC_T
// (its Q and O modes) before it is added; the running sum converted to ACC_T after every add;
// ReLU on the accumulator, then the conversion to OUT_T.
//
// Apache-2.0 ap_int/ap_fixed headers only (ap_types/, see PROVENANCE.md); no hls_stream.h.
#ifndef OFFLOAD_HLS_H
#define OFFLOAD_HLS_H

#include <ap_fixed.h>
#include <stdint.h>

#ifdef OFFLOAD_USE_TYPES_H
#include "offload_types.h"
#endif

#ifndef DATA_T
#define DATA_T ap_fixed<16, 6>
#endif
#ifndef WEIGHT_T
#define WEIGHT_T DATA_T
#endif
#ifndef BIAS_T
#define BIAS_T DATA_T
#endif
#ifndef ACC_T
#define ACC_T ap_fixed<32, 12>
#endif
#ifndef OUT_T
#define OUT_T DATA_T
#endif

// On-chip buffer sizes (elements); a call with larger dimensions does nothing (the host checks
// first). Large enough for the zoo jet models: jet_mlp 16-64-32-32-5, jet_cnn 1x40x40 .. 32x5x5.
#ifndef DENSE_MAX_IN
#define DENSE_MAX_IN 1024
#endif
#ifndef DENSE_MAX_OUT
#define DENSE_MAX_OUT 256
#endif
#ifndef DENSE_MAX_W
#define DENSE_MAX_W 65536
#endif
#ifndef CONV_MAX_IN
#define CONV_MAX_IN 32768  // c_in * h * w of one event
#endif
#ifndef CONV_MAX_COUT
#define CONV_MAX_COUT 128
#endif
#ifndef CONV_MAX_W
#define CONV_MAX_W 36864  // c_out * c_in * kh * kw
#endif
#ifndef POOL_MAX_SHIFT
#define POOL_MAX_SHIFT 4  // average pooling: window area 2^shift, shift <= 4 (up to 4x4)
#endif

typedef DATA_T data_t;
typedef WEIGHT_T weight_t;
typedef BIAS_T bias_t;
typedef ACC_T acc_t;
typedef OUT_T out_t;

// ---- raw storage ---------------------------------------------------------------------------
template <bool C, class A, class B> struct fx_select { typedef A type; };
template <class A, class B> struct fx_select<false, A, B> { typedef B type; };

template <int W, bool S> struct fx_store {
  typedef typename fx_select<
      (W <= 8), typename fx_select<S, int8_t, uint8_t>::type,
      typename fx_select<
          (W <= 16), typename fx_select<S, int16_t, uint16_t>::type,
          typename fx_select<(W <= 32), typename fx_select<S, int32_t, uint32_t>::type,
                             typename fx_select<S, int64_t, uint64_t>::type>::type>::type>::type
      type;
};

template <class T> struct fx_info;
template <int W, int I, ap_q_mode Q, ap_o_mode O, int N>
struct fx_info<ap_fixed<W, I, Q, O, N> > {
  static const int width = W, iwidth = I;
  static const bool is_signed = true;
  typedef typename fx_store<W, true>::type store_t;
  typedef ap_int<W> bits_t;
};
template <int W, int I, ap_q_mode Q, ap_o_mode O, int N>
struct fx_info<ap_ufixed<W, I, Q, O, N> > {
  static const int width = W, iwidth = I;
  static const bool is_signed = false;
  typedef typename fx_store<W, false>::type store_t;
  typedef ap_uint<W> bits_t;
};

// raw integer -> value (bit reinterpretation)
template <class T>
inline T fx_load(typename fx_info<T>::store_t r) {
#pragma HLS INLINE
  T v;
  v.range(fx_info<T>::width - 1, 0) = r;
  return v;
}

// value -> raw integer, sign- or zero-extended to the storage type
template <class T>
inline typename fx_info<T>::store_t fx_store_raw(const T& v) {
#pragma HLS INLINE
  typename fx_info<T>::bits_t b = v.range(fx_info<T>::width - 1, 0);
  return (typename fx_info<T>::store_t)(fx_info<T>::is_signed ? (int64_t)b.to_int64()
                                                              : (int64_t)b.to_uint64());
}

typedef fx_info<data_t>::store_t data_s;
typedef fx_info<weight_t>::store_t weight_s;
typedef fx_info<bias_t>::store_t bias_s;
typedef fx_info<out_t>::store_t out_s;

// Average pooling: the window sum read with POOL_MAX_SHIFT more fractional bits (one more
// integer bit, so an ap_ufixed accumulator fits too), so that ">> log2(area)" is exact.
typedef ap_fixed<fx_info<acc_t>::width + 1 + POOL_MAX_SHIFT, fx_info<acc_t>::iwidth + 1> avg_t;

extern "C" {
void dense(const data_s* x, const weight_s* w, const bias_s* b, out_s* y, int batch, int n_in,
           int n_out, int relu);
void conv2d(const data_s* x, const weight_s* w, const bias_s* b, out_s* y, int batch, int c_in,
            int height, int width, int c_out, int kh, int kw, int pad, int relu);
void maxpool2d(const data_s* x, out_s* y, int batch, int channels, int height, int width, int k);
void avgpool2d(const data_s* x, out_s* y, int batch, int channels, int height, int width, int k);
}

#endif  // OFFLOAD_HLS_H
