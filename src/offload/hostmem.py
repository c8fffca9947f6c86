"""Host memory from the C++ extension ``offload._core``: 4 KiB-aligned blocks as NumPy arrays."""

from __future__ import annotations

import numpy as np

from ._core import ALIGNMENT, address
from ._core import aligned_empty as _aligned_empty

__all__ = ["ALIGNMENT", "address", "aligned_empty", "empty"]


def aligned_empty(nbytes: int) -> np.ndarray:
    """A writeable uint8 array of ``nbytes`` whose data starts on a 4 KiB boundary."""
    return _aligned_empty(int(nbytes), ALIGNMENT)


def empty(shape, dtype=np.float32) -> np.ndarray:
    """An uninitialised, 4 KiB-aligned, C-contiguous array of ``shape`` and ``dtype``."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    return _aligned_empty(count * dtype.itemsize, ALIGNMENT)[:count * dtype.itemsize] \
        .view(dtype).reshape(shape)
