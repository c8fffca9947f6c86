// The checks the kernel files make before touching memory (row_kernels.cpp, index_kernels.cpp).
#pragma once

#include <nanobind/nanobind.h>

#include <string>

namespace offload {

// A ValueError with ``what`` (expected and got) unless ``ok``.
inline void check(bool ok, const std::string &what) {
    if (!ok) throw nanobind::value_error(what.c_str());
}

// "[2, 3, 4]": an array's shape for messages.
template <typename A> std::string shape_of(const A &a) {
    std::string s = "[";
    for (size_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + "]";
}

}  // namespace offload
