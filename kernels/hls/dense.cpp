// Dense layer (+bias, optional ReLU), the batch loop inside the kernel: one run per batch.
//   x [batch, n_in]  (DATA_T raw)     w [n_out, n_in] (WEIGHT_T raw, ONNX Gemm transB=1 layout)
//   b [n_out]        (BIAS_T raw)     y [batch, n_out] (OUT_T raw)
// Per event and output o:
//   acc = ACC_T(b[o]);  for k in 0..n_in-1: acc += ACC_T(x[k] * w[o][k]);
//   y[o] = OUT_T(relu && acc < 0 ? 0 : acc)
// Weights and biases are read into on-chip buffers once per run.
#include "offload_hls.h"

extern "C" void dense(const data_s* x, const weight_s* w, const bias_s* b, out_s* y, int batch,
                      int n_in, int n_out, int relu) {
#pragma HLS INTERFACE m_axi port = x offset = slave bundle = gmem0 depth = 16384
#pragma HLS INTERFACE m_axi port = w offset = slave bundle = gmem1 depth = 65536
#pragma HLS INTERFACE m_axi port = b offset = slave bundle = gmem1 depth = 256
#pragma HLS INTERFACE m_axi port = y offset = slave bundle = gmem0 depth = 16384
#pragma HLS INTERFACE s_axilite port = x bundle = control
#pragma HLS INTERFACE s_axilite port = w bundle = control
#pragma HLS INTERFACE s_axilite port = b bundle = control
#pragma HLS INTERFACE s_axilite port = y bundle = control
#pragma HLS INTERFACE s_axilite port = batch bundle = control
#pragma HLS INTERFACE s_axilite port = n_in bundle = control
#pragma HLS INTERFACE s_axilite port = n_out bundle = control
#pragma HLS INTERFACE s_axilite port = relu bundle = control
#pragma HLS INTERFACE s_axilite port = return bundle = control
  if (batch < 1 || n_in < 1 || n_out < 1 || n_in > DENSE_MAX_IN || n_out > DENSE_MAX_OUT ||
      n_in * n_out > DENSE_MAX_W)
    return;

  weight_t wbuf[DENSE_MAX_W];
  acc_t bbuf[DENSE_MAX_OUT];
  data_t xbuf[DENSE_MAX_IN];

load_w:
  for (int i = 0; i < n_in * n_out; ++i) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 65536
#pragma HLS PIPELINE II = 1
    wbuf[i] = fx_load<weight_t>(w[i]);
  }
load_b:
  for (int o = 0; o < n_out; ++o) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 256
#pragma HLS PIPELINE II = 1
    bbuf[o] = fx_load<bias_t>(b[o]);  // converted to ACC_T
  }

events:
  for (int n = 0; n < batch; ++n) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 1024
  load_x:
    for (int k = 0; k < n_in; ++k) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 1024
#pragma HLS PIPELINE II = 1
      xbuf[k] = fx_load<data_t>(x[(long)n * n_in + k]);
    }
  outputs:
    for (int o = 0; o < n_out; ++o) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 256
      acc_t acc = bbuf[o];
    macs:
      for (int k = 0; k < n_in; ++k) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = 1024
#pragma HLS PIPELINE II = 1
        acc_t p = xbuf[k] * wbuf[o * n_in + k];  // exact product, converted to ACC_T
        acc += p;                                // exact sum, converted to ACC_T
      }
      if (relu && acc < 0) acc = 0;
      out_t r = acc;
      y[(long)n * n_out + o] = fx_store_raw<out_t>(r);
    }
  }
}
