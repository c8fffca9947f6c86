// Index kernels of the graph taggers (top-k, reductions over trailing axes) for the
// NumPy CPU device.
//
// Every entry point checks shapes, dtypes and overlaps before touching memory.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include "pool.h"

namespace nb = nanobind;

void register_index_kernels(nb::module_ &m) { (void) m; }
