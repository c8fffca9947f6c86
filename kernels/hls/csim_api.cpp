// C-simulation only (not part of the FPGA build): lets offload.fpga.hls_csim check that the library
// it loaded was compiled with the types and limits it expects.
#include "offload_hls.h"

#ifdef __SYNTHESIS__
#error "csim_api.cpp is for C-simulation with a host compiler only"
#endif

template <class T>
static void put_type(long long* out) {
  out[0] = fx_info<T>::width;
  out[1] = fx_info<T>::iwidth;
  out[2] = fx_info<T>::is_signed;
  out[3] = (long long)T::qmode;
  out[4] = (long long)T::omode;
  out[5] = (long long)sizeof(typename fx_info<T>::store_t);
}

// out: 5 types x 6 fields (data, weight, bias, acc, out: width, iwidth, signed, q, o, store
// bytes), then DENSE_MAX_IN, DENSE_MAX_OUT, DENSE_MAX_W, CONV_MAX_IN, CONV_MAX_COUT, CONV_MAX_W,
// POOL_MAX_SHIFT: 37 values.
extern "C" void offload_hls_info(long long* out) {
  put_type<data_t>(out + 0);
  put_type<weight_t>(out + 6);
  put_type<bias_t>(out + 12);
  put_type<acc_t>(out + 18);
  put_type<out_t>(out + 24);
  long long lim[7] = {DENSE_MAX_IN, DENSE_MAX_OUT, DENSE_MAX_W, CONV_MAX_IN,
                      CONV_MAX_COUT, CONV_MAX_W, POOL_MAX_SHIFT};
  for (int i = 0; i < 7; ++i) out[30 + i] = lim[i];
}
