"""Floating-point precisions a model may run in on a coprocessor.

=========== ======================== ==================================================
precision   tensors in device memory arithmetic
=========== ======================== ==================================================
float32     float32                  float32 (the default; the CPU device's only one)
tf32        float32                  matrix products on TF32 tensor cores (10-bit
                                     mantissa inputs, float32 accumulation); the rest float32
float16     IEEE half                float32: every kernel converts on load and store;
                                     matrix products accumulate in float32
bfloat16    bfloat16 (raw 16 bits)   as float16
=========== ======================== ==================================================

Weights are converted once at plan build, inputs on the host before they are copied in (so the
copy moves half the bytes), outputs back to float32 on the host: a model takes and returns
float32 arrays whatever its precision. Conversions to 16 bits round to nearest even.
"""

from __future__ import annotations

import numpy as np

FLOAT_PRECISIONS = ("float32", "tf32", "float16", "bfloat16")
# Fixed point (offload.fpga.fixed_point): the graph carries the ap_fixed types per layer; tensors
# between layers are float32 holding exact fixed-point values, so the plan stores float32.
FIXED = "ap_fixed"

# The storage dtype on the host side: bfloat16 travels as its raw 16 bits.
_STORAGE = {"float32": np.dtype(np.float32), "tf32": np.dtype(np.float32),
            "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16),
            FIXED: np.dtype(np.float32)}
# The kernels' storage macro (dialect.h): tensors in global memory are `real`.
_DEFINES = {"float16": {"STORAGE_F16": 1}, "bfloat16": {"STORAGE_BF16": 1}}


def check(precision: str) -> str:
    """``precision`` if it is a known float precision, else ValueError naming the known ones."""
    if precision not in FLOAT_PRECISIONS and precision != FIXED:
        raise ValueError(f"unknown precision {precision!r}; float precisions are "
                         f"{list(FLOAT_PRECISIONS)}")
    return precision


def storage_dtype(precision: str) -> np.dtype:
    """The NumPy dtype holding one tensor element in device memory (uint16 for bfloat16)."""
    return _STORAGE[precision]


def kernel_defines(precision: str) -> dict:
    """The defines that compile the shared kernels for this precision's storage."""
    return dict(_DEFINES.get(precision, {}))


def to_storage(x: np.ndarray, precision: str) -> np.ndarray:
    """``x`` (any float array) as a C-contiguous array of the storage dtype."""
    if precision == "bfloat16":
        return float32_to_bfloat16_bits(x)
    with np.errstate(over="ignore"):  # overflow gives infinity, as the device's conversion
        return np.ascontiguousarray(x, dtype=_STORAGE[precision])


def from_storage(raw: np.ndarray, precision: str, out: np.ndarray | None = None) -> np.ndarray:
    """float32 values of a storage array (into ``out`` when given)."""
    if precision == "bfloat16":
        values = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        values = raw
    if out is None:
        return np.array(values, dtype=np.float32)
    np.copyto(out, values.reshape(out.shape), casting="unsafe")
    return out


def float32_to_bfloat16_bits(x) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of ``x``, rounded to nearest even; NaN stays a (quiet) NaN
    and overflow past bfloat16's largest finite value gives infinity, as in hardware."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def round_trip(x: np.ndarray, precision: str) -> np.ndarray:
    """float32 ``x`` rounded through the storage type (what a stored tensor holds)."""
    return from_storage(to_storage(x, precision), precision)
