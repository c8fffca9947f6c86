// offload._core: small native helpers for the offload package.
//
//   aligned_empty(nbytes, alignment=4096) -> numpy.ndarray[uint8] (zero-copy,
//       backed by std::aligned_alloc, freed by a capsule deleter)
//   address(obj) -> int  data pointer of any DLPack / buffer-protocol object
//   ALIGNMENT = 4096
//   dense, epilogue, softmax: fused float32 CPU kernels (cpu_kernels.cpp)

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>

namespace nb = nanobind;

namespace {

constexpr std::int64_t kDefaultAlignment = 4096;
constexpr std::int64_t kMinAlignment = 64;

using ByteArray = nb::ndarray<nb::numpy, std::uint8_t, nb::ndim<1>>;

bool is_power_of_two(std::int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

ByteArray aligned_empty(std::int64_t nbytes, std::int64_t alignment) {
    if (alignment < kMinAlignment || !is_power_of_two(alignment))
        throw nb::value_error(
            ("aligned_empty(): alignment must be a power of two >= 64, got " +
             std::to_string(alignment)).c_str());
    if (nbytes < 0)
        throw nb::value_error(
            ("aligned_empty(): nbytes must be >= 0, got " +
             std::to_string(nbytes)).c_str());

    const std::size_t align = static_cast<std::size_t>(alignment);
    const std::size_t n = static_cast<std::size_t>(nbytes);

    // std::aligned_alloc requires size to be a non-zero multiple of the
    // alignment. nbytes == 0 still gets one alignment unit so that the pointer
    // is valid and unique.
    std::size_t alloc = 0;
    void *ptr = nullptr;
    if (n <= std::numeric_limits<std::size_t>::max() - (align - 1)) {
        alloc = (n + align - 1) & ~(align - 1);
        if (alloc == 0)
            alloc = align;
        ptr = std::aligned_alloc(align, alloc);
    }
    if (!ptr) {
        PyErr_Format(PyExc_MemoryError,
                     "aligned_empty(): could not allocate %lld bytes "
                     "(alignment %lld)",
                     (long long) nbytes, (long long) alignment);
        throw nb::python_error();
    }

    // The capsule owns the memory; the ndarray (and the numpy array built on
    // top of it, plus any views of that) keep the capsule alive.
    nb::capsule owner;
    try {
        owner = nb::capsule(ptr, [](void *p) noexcept { std::free(p); });
    } catch (...) {
        std::free(ptr);  // capsule creation failed: nobody owns ptr yet
        throw;
    }
    return ByteArray(ptr, {n}, owner);
}

std::uintptr_t address(nb::handle obj) {
    // 1) DLPack / buffer protocol via nanobind's ndarray caster. nb::ro is
    //    required, otherwise read-only arrays are rejected. convert=false so
    //    that nanobind never makes a copy (a copy would have another address).
    nb::ndarray<nb::ro> arr;
    if (nb::try_cast(obj, arr, /*convert=*/false))
        return reinterpret_cast<std::uintptr_t>(arr.data());

    // 2) Plain buffer protocol for formats DLPack cannot describe
    //    (object dtype, structured dtypes, ...).
    Py_buffer view;
    if (PyObject_GetBuffer(obj.ptr(), &view, PyBUF_RECORDS_RO) == 0) {
        auto p = reinterpret_cast<std::uintptr_t>(view.buf);
        PyBuffer_Release(&view);
        return p;
    }
    PyErr_Clear();

    throw nb::type_error(
        ("address(): expected an object supporting DLPack or the buffer "
         "protocol, got " + std::string(nb::type_name(obj.type()).c_str()))
            .c_str());
}

}  // namespace

void register_cpu_kernels(nb::module_ &m);  // cpu_kernels.cpp

NB_MODULE(_core, m) {
    m.doc() = "Native helpers for offload (aligned host buffers, pointers).";

    m.attr("ALIGNMENT") = kDefaultAlignment;

    m.def("aligned_empty", &aligned_empty, nb::arg("nbytes"),
          nb::arg("alignment") = kDefaultAlignment,
          nb::sig("def aligned_empty(nbytes: int, alignment: int = 4096) "
                  "-> numpy.ndarray"),
          "Return an uninitialised, writeable uint8 numpy array of shape "
          "(nbytes,) whose memory is allocated with std::aligned_alloc at the "
          "given alignment (a power of two >= 64). The memory is owned by the "
          "array (zero copy) and freed when the last reference goes away.");

    m.def("address", &address, nb::arg("array"),
          nb::sig("def address(array: object) -> int"),
          "Return the data pointer (as int) of an object that supports DLPack "
          "or the buffer protocol, without copying it.");

    register_cpu_kernels(m);
}
