/* common.h: helpers shared by every op source: activations and the fused epilogue. */
#ifndef OFFLOAD_COMMON_H
#define OFFLOAD_COMMON_H
#include "dialect.h"

/* Activation codes, as in offload.drivers.opencl.ACTIVATIONS. */
#define ACT_IDENTITY 0
#define ACT_RELU 1
#define ACT_LEAKY_RELU 2
#define ACT_SIGMOID 3
#define ACT_TANH 4
#define ACT_CLIP 5

/* NaN-propagating max (NumPy's maximum): NaN in either operand gives NaN. */
DEVICE_FN float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }

/* The activation fn(x); NaN goes through every activation unchanged. */
DEVICE_FN float activate(float x, int act, float alpha, float lo, float hi)
{
    switch (act) {
    case ACT_RELU: return x < 0.0f ? 0.0f : x;
    case ACT_LEAKY_RELU: return x < 0.0f ? x * alpha : x;
    case ACT_SIGMOID: return 1.0f / (1.0f + EXP(-x));
    case ACT_TANH: return TANH(x);
    case ACT_CLIP: return x < lo ? lo : (x > hi ? hi : x);
    default: return x;
    }
}

#endif /* OFFLOAD_COMMON_H */
