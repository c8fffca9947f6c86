// The checks the kernel files make before touching memory (every csrc/*_kernels.cpp).
#pragma once

#include <nanobind/nanobind.h>

#include <string>

// A ValueError with the message ``what`` (what was expected and what came) unless ``ok``; the
// message is built only when the check fails: built on every call, the strings took ~2 us of a
// 5 us kernel call.
#define OFFLOAD_CHECK(ok, what)                                                          \
    do {                                                                                 \
        if (!(ok)) throw nanobind::value_error(std::string(what).c_str());               \
    } while (0)

namespace offload {

// The same as a function, for a condition and message computed beforehand.
inline void check(bool ok, const std::string &what) { OFFLOAD_CHECK(ok, what); }

// "[2, 3, 4]": an array's shape for messages.
template <typename A> std::string shape_of(const A &a) {
    std::string s = "[";
    for (size_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + "]";
}

}  // namespace offload
