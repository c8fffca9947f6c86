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

#include <cstdint>

namespace offload {

// "[2, 3, 4]": an array's shape for messages.
template <typename A> std::string shape_of(const A &a) {
    std::string s = "[";
    for (size_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + "]";
}

// An output that overlaps an operand would be read after it was written: a wrong answer, so it
// is refused. Only ``same_ok`` allows the exact same array (in-place kernels such as softmax).
template <typename A, typename B>
void check_apart(const std::string &fn, const std::string &what, const A &out, const B &in,
                 bool same_ok = false) {
    const auto o0 = reinterpret_cast<std::uintptr_t>(out.data());
    const auto o1 = o0 + out.size() * sizeof(*out.data());
    const auto i0 = reinterpret_cast<std::uintptr_t>(in.data());
    const auto i1 = i0 + in.size() * sizeof(*in.data());
    if (o0 >= o1 || i0 >= i1 || o1 <= i0 || i1 <= o0) return;
    if (same_ok && o0 == i0 && o1 == i1) return;
    throw nanobind::value_error((fn + ": out overlaps " + what +
                                 " (it would be read after being written); pass separate arrays")
                                    .c_str());
}

}  // namespace offload
