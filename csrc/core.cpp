// offload._core: small native helpers for the offload package.
//
//   aligned_empty(nbytes, alignment=4096) -> numpy.ndarray[uint8] (zero-copy,
//       aligned block from malloc, freed by a capsule deleter)
//   address(obj) -> int  data pointer of any DLPack / buffer-protocol object
//   ALIGNMENT = 4096
//   HostBuffer(shape, typestr="|u1", pinned=False): the owner of one 4 KiB-aligned block,
//       optionally page-locked through the CUDA runtime (loaded with dlopen, never linked);
//       buffer protocol (typed, n-d) and DLPack (__dlpack__, __dlpack_device__)
//   load_cuda_runtime(candidates) -> str   path of the CUDA runtime in use (loads it once)
//   copy(dst, src): one memmove between C-contiguous host buffers, GIL released when large
//   gather(out, parts) -> int: parts copied back to back into out, the rest zeroed (GIL released)
//   unshared(list) -> int: index of the first item only the list refers to (arena reuse)
//   dense, epilogue, softmax: fused float32 CPU kernels (cpu_kernels.cpp)
//   conv_direct, conv_gemm, gemm_dense, set_num_threads, blas_load: convolutions, large
//       products and the CPU device's thread pool (conv_kernels.cpp)
//   rnn: the time loop of one LSTM/GRU layer (rnn_kernels.cpp)
//   topk, reduce: top-k indices and sum/mean/max/min along one axis (index_kernels.cpp)

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <dlfcn.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)  // the CI build with -DOFFLOAD_SANITIZE=ON
#include <sanitizer/asan_interface.h>
#define OFFLOAD_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define OFFLOAD_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define OFFLOAD_POISON(p, n) ((void) (p), (void) (n))
#define OFFLOAD_UNPOISON(p, n) ((void) (p), (void) (n))
#endif

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

namespace nb = nanobind;

namespace {

constexpr std::int64_t kDefaultAlignment = 4096;
constexpr std::int64_t kMinAlignment = 64;
constexpr std::size_t kMaxDims = 64;  // PyBUF_MAX_NDIM

using ByteArray = nb::ndarray<nb::numpy, std::uint8_t, nb::ndim<1>>;

bool is_power_of_two(std::int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// Aligned blocks from plain malloc, the original pointer kept in the word before the block.
// Not std::aligned_alloc: glibc serves an aligned request above its mmap threshold (128 KiB)
// with a fresh mmap every time (its dynamic threshold never rises for aligned chunks), so each
// such block costs page faults on first touch (256 KiB: ~100 us instead of ~4 us). Plain malloc
// reuses freed heap memory like np.empty does.
// Under AddressSanitizer the bytes around the ``used`` ones (the lead, the rounding up to whole
// alignment units) are poisoned, so that an overflow past the array is reported although it
// stays inside the malloc'ed block.
// Bytes of physical memory (0: unknown). A block larger than that is refused before malloc:
// with overcommit, malloc would promise it and the process be killed on touching it.
std::size_t physical_memory() {
    static const std::size_t bytes = [] {
        long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGE_SIZE);
        return pages > 0 && size > 0 ? (std::size_t) pages * (std::size_t) size : 0;
    }();
    return bytes;
}

void *aligned_malloc(std::size_t nbytes, std::size_t align, std::size_t used) {
    if (nbytes > std::numeric_limits<std::size_t>::max() - align - sizeof(void *))
        return nullptr;
    if (physical_memory() && nbytes > physical_memory())
        return nullptr;
    void *raw = std::malloc(nbytes + align + sizeof(void *));
    if (!raw)
        return nullptr;
    std::uintptr_t p = reinterpret_cast<std::uintptr_t>(raw) + sizeof(void *);
    p = (p + align - 1) & ~(std::uintptr_t) (align - 1);
    reinterpret_cast<void **>(p)[-1] = raw;
    OFFLOAD_POISON(raw, p - reinterpret_cast<std::uintptr_t>(raw));
    OFFLOAD_POISON(reinterpret_cast<char *>(p) + used, nbytes - used);
    return reinterpret_cast<void *>(p);
}

void aligned_free(void *ptr) noexcept {
    if (!ptr)
        return;
    void **slot = reinterpret_cast<void **>(ptr) - 1;
    OFFLOAD_UNPOISON(slot, sizeof(void *));
    std::free(*slot);
}

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

    // Whole alignment units; nbytes == 0 still gets one so that the pointer
    // is valid and unique.
    void *ptr = nullptr;
    if (n <= std::numeric_limits<std::size_t>::max() - (align - 1)) {
        std::size_t alloc = (n + align - 1) & ~(align - 1);
        ptr = aligned_malloc(alloc ? alloc : align, align, n);
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
        owner = nb::capsule(ptr, [](void *p) noexcept { aligned_free(p); });
    } catch (...) {
        aligned_free(ptr);  // capsule creation failed: nobody owns ptr yet
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


// ---------------------------------------------------------------------------------------------
// The CUDA runtime, loaded at run time (the module never links against CUDA).

struct CudaRuntime {
    using register_fn = int (*)(void *, std::size_t, unsigned int);
    using unregister_fn = int (*)(void *);
    using error_string_fn = const char *(*)(int);

    std::mutex mutex;
    void *lib = nullptr;
    std::string path;
    register_fn host_register = nullptr;
    unregister_fn host_unregister = nullptr;
    error_string_fn error_string = nullptr;

    std::string describe(int code) const {
        const char *text = error_string ? error_string(code) : nullptr;
        return "CUDA error " + std::to_string(code) + " (" + (text ? text : "unknown") + ")";
    }
};

CudaRuntime g_cuda;  // loaded once, never unloaded: pinned buffers unregister through it

constexpr unsigned int kCudaHostRegisterPortable = 1;  // pinned for every CUDA context

std::string load_cuda_runtime(const std::vector<std::string> &candidates) {
    std::lock_guard<std::mutex> lock(g_cuda.mutex);
    if (g_cuda.lib)
        return g_cuda.path;
    std::string reasons;
    for (const std::string &name : candidates)
        if (name.find('\0') != std::string::npos)
            throw nb::value_error("load_cuda_runtime(): a library name holds a NUL byte");
    for (const std::string &name : candidates) {
        void *lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!lib) {
            const char *err = dlerror();
            reasons += "\n  " + name + ": " + (err ? err : "not found");
            continue;
        }
        auto reg = reinterpret_cast<CudaRuntime::register_fn>(dlsym(lib, "cudaHostRegister"));
        auto unreg = reinterpret_cast<CudaRuntime::unregister_fn>(dlsym(lib, "cudaHostUnregister"));
        auto errstr = reinterpret_cast<CudaRuntime::error_string_fn>(dlsym(lib, "cudaGetErrorString"));
        if (!reg || !unreg || !errstr) {
            reasons += "\n  " + name + ": loaded, but cudaHostRegister, cudaHostUnregister or "
                       "cudaGetErrorString is missing";
            dlclose(lib);
            continue;
        }
        g_cuda.lib = lib;
        g_cuda.path = name;
        g_cuda.host_register = reg;
        g_cuda.host_unregister = unreg;
        g_cuda.error_string = errstr;
        return name;
    }
    throw std::runtime_error("no loadable CUDA runtime (expected one of the libraries below "
                             "with cudaHostRegister):" + reasons);
}

// ---------------------------------------------------------------------------------------------
// HostBuffer: the owner of one aligned (optionally page-locked) block of host memory.

struct ElementType {
    const char *format;          // PEP 3118 format
    nb::dlpack::dtype dtype;     // DLPack type
};

// typestr as NumPy's dtype.str spells it: byte order, kind, item size ("<f4", "|u1", ...).
ElementType parse_typestr(const std::string &typestr) {
    auto bad = [&](const char *why) {
        return nb::value_error(("HostBuffer: unsupported typestr " + typestr + " (" + why +
                                "); expected e.g. '<f4', '<i8', '|u1', '|b1'").c_str());
    };
    if (typestr.size() < 3)
        throw bad("too short");
    const char order = typestr[0], kind = typestr[1];
    if (order == '>')
        throw bad("big-endian");
    if (order != '<' && order != '|' && order != '=')
        throw bad("byte order must be '<', '|' or '='");
    int size = 0;
    for (std::size_t i = 2; i < typestr.size(); ++i) {
        if (typestr[i] < '0' || typestr[i] > '9' || size > 64)
            throw bad("item size must be a number");
        size = size * 10 + (typestr[i] - '0');
    }
    using code = nb::dlpack::dtype_code;
    auto dt = [](code c, int bytes) {
        return nb::dlpack::dtype{(std::uint8_t) c, (std::uint8_t) (8 * bytes), 1};
    };
    switch (kind) {
        case 'f':
            if (size == 2) return {"e", dt(code::Float, 2)};
            if (size == 4) return {"f", dt(code::Float, 4)};
            if (size == 8) return {"d", dt(code::Float, 8)};
            break;
        case 'i':
            if (size == 1) return {"b", dt(code::Int, 1)};
            if (size == 2) return {"h", dt(code::Int, 2)};
            if (size == 4) return {"i", dt(code::Int, 4)};
            if (size == 8) return {"q", dt(code::Int, 8)};
            break;
        case 'u':
            if (size == 1) return {"B", dt(code::UInt, 1)};
            if (size == 2) return {"H", dt(code::UInt, 2)};
            if (size == 4) return {"I", dt(code::UInt, 4)};
            if (size == 8) return {"Q", dt(code::UInt, 8)};
            break;
        case 'b':
            if (size == 1) return {"?", dt(code::Bool, 1)};
            break;
        case 'c':
            if (size == 8) return {"Zf", dt(code::Complex, 8)};
            if (size == 16) return {"Zd", dt(code::Complex, 16)};
            break;
    }
    throw bad("kind and size not supported");
}

struct HostBuffer {
    void *ptr = nullptr;
    std::size_t nbytes = 0;
    bool pinned = false;
    ElementType type;
    std::vector<Py_ssize_t> shape, strides;  // for the buffer protocol
    std::vector<std::size_t> dl_shape;       // for DLPack

    HostBuffer(const std::vector<std::int64_t> &shape_, const std::string &typestr, bool pin)
        : type(parse_typestr(typestr)) {
        if (shape_.size() > kMaxDims)
            throw nb::value_error(("HostBuffer: at most " + std::to_string(kMaxDims) +
                                   " dimensions (the buffer protocol's limit), got " +
                                   std::to_string(shape_.size())).c_str());
        const std::size_t itemsize = type.dtype.bits / 8;
        std::size_t count = 1;
        bool overflow = false;
        for (std::int64_t d : shape_) {
            if (d < 0)
                throw nb::value_error(("HostBuffer: shape entries must be >= 0, got " +
                                       std::to_string(d)).c_str());
            if (d != 0 && count > std::numeric_limits<std::size_t>::max() / (std::size_t) d)
                overflow = true;
            count *= (std::size_t) d;
            shape.push_back((Py_ssize_t) d);
            dl_shape.push_back((std::size_t) d);
        }
        strides.resize(shape.size());
        Py_ssize_t stride = (Py_ssize_t) itemsize;
        for (std::size_t i = shape.size(); i-- > 0;) {
            strides[i] = stride;
            stride *= shape[i];
        }
        const std::size_t align = (std::size_t) kDefaultAlignment;
        if (overflow || count > (std::numeric_limits<std::size_t>::max() - align) / itemsize)
            throw std::bad_alloc();
        nbytes = count * itemsize;
        std::size_t alloc = (nbytes + align - 1) & ~(align - 1);
        if (!alloc)
            alloc = align;
        ptr = aligned_malloc(alloc, align, nbytes);
        if (!ptr) {
            PyErr_Format(PyExc_MemoryError,
                         "HostBuffer: could not allocate %zu bytes (4096-aligned)", nbytes);
            throw nb::python_error();
        }
        if (pin) {
            if (!g_cuda.lib) {
                aligned_free(ptr);
                throw std::runtime_error("pinned=True: the CUDA runtime is not loaded "
                                         "(call load_cuda_runtime first)");
            }
            int rc = g_cuda.host_register(ptr, alloc, kCudaHostRegisterPortable);
            if (rc != 0) {
                aligned_free(ptr);
                throw std::runtime_error("pinned=True: cudaHostRegister of " +
                                         std::to_string(alloc) + " bytes failed: " +
                                         g_cuda.describe(rc));
            }
            pinned = true;
        }
    }

    HostBuffer(const HostBuffer &) = delete;
    HostBuffer &operator=(const HostBuffer &) = delete;

    ~HostBuffer() {
        if (pinned)
            g_cuda.host_unregister(ptr);  // nothing to report to: the memory is freed anyway
        aligned_free(ptr);
    }

    int dl_device_type() const {
        return pinned ? nb::device::cuda_host::value : nb::device::cpu::value;
    }
};

int hostbuffer_getbuffer(PyObject *self, Py_buffer *view, int flags) {
    // HostBuffer.__new__ alone, or a subclass whose __init__ skips the base, leaves the C++
    // object unconstructed: there is no block to expose.
    if (!nb::inst_ready(self)) {
        view->obj = nullptr;
        PyErr_Format(PyExc_BufferError,
                     "%s: the HostBuffer was never initialised (a subclass's __init__ must "
                     "call HostBuffer.__init__)", Py_TYPE(self)->tp_name);
        return -1;
    }
    HostBuffer *hb = nb::inst_ptr<HostBuffer>(self);
    view->obj = Py_NewRef(self);
    view->buf = hb->ptr;
    view->len = (Py_ssize_t) hb->nbytes;
    view->readonly = 0;
    view->itemsize = (Py_ssize_t) (hb->type.dtype.bits / 8);
    view->format = (flags & PyBUF_FORMAT) ? const_cast<char *>(hb->type.format) : nullptr;
    if (flags & PyBUF_ND) {
        view->ndim = (int) hb->shape.size();
        view->shape = hb->shape.data();
    } else {  // a plain run of bytes
        view->ndim = 1;
        view->shape = nullptr;
    }
    view->strides = ((flags & PyBUF_STRIDES) == PyBUF_STRIDES) ? hb->strides.data() : nullptr;
    view->suboffsets = nullptr;
    view->internal = nullptr;
    return 0;
}

PyType_Slot hostbuffer_slots[] = {
    {Py_bf_getbuffer, (void *) hostbuffer_getbuffer},
    {0, nullptr},
};

// ---------------------------------------------------------------------------------------------
// Copies between C-contiguous host buffers.

constexpr std::size_t kReleaseGilBytes = 64 * 1024;  // below this the GIL round trip costs more

struct Buffer {  // a held Py_buffer, released with the GIL held
    Py_buffer view{};
    bool held = false;
    Buffer() = default;
    Buffer(const Buffer &) = delete;
    Buffer(Buffer &&o) noexcept : view(o.view), held(o.held) { o.held = false; }
    ~Buffer() {
        if (held)
            PyBuffer_Release(&view);
    }
};

void get_buffer(Buffer &b, nb::handle obj, bool writable, const char *what) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj.ptr(), &b.view, flags) != 0) {
        PyErr_Clear();
        throw nb::type_error((std::string(what) + " must be a C-contiguous" +
                              (writable ? ", writeable" : "") +
                              " host buffer (NumPy array, HostBuffer, memoryview), got " +
                              nb::type_name(obj.type()).c_str() +
                              " that is not (or is strided / read-only)").c_str());
    }
    b.held = true;
}

void copy_bytes(void *dst, const void *src, std::size_t n) {
    if (n >= kReleaseGilBytes) {
        nb::gil_scoped_release release;
        std::memmove(dst, src, n);
    } else {
        std::memmove(dst, src, n);
    }
}

void copy(nb::handle dst, nb::handle src) {
    Buffer d, s;
    get_buffer(d, dst, true, "copy(): dst");
    get_buffer(s, src, false, "copy(): src");
    if (d.view.len != s.view.len)
        throw nb::value_error(("copy(): dst and src must have the same size: dst has " +
                               std::to_string(d.view.len) + " bytes, src has " +
                               std::to_string(s.view.len) + " bytes").c_str());
    copy_bytes(d.view.buf, s.view.buf, (std::size_t) d.view.len);
}

std::string shape_text(const Py_buffer &v, int from) {
    std::string t = "(";
    for (int i = from; i < v.ndim; ++i)
        t += std::to_string(v.shape[i]) + (v.ndim - from == 1 ? "," : (i + 1 < v.ndim ? ", " : ""));
    return t + ")";
}

// parts[i] of shape (rows_i, *sample) copied back to back into out of shape (rows, *sample);
// the rows after them are zeroed. Returns the number of rows written; with strict=false, -1
// (nothing written) where a part is not C-contiguous or not of out's format and sample shape.
std::int64_t gather(nb::handle out, nb::sequence parts, bool strict) {
    Buffer o;
    get_buffer(o, out, true, "gather(): out");
    if (o.view.ndim < 1)
        throw nb::value_error("gather(): out must have a batch axis, got a 0-d buffer");
    const std::string out_format = o.view.format ? o.view.format : "B";
    // A tuple of the parts, taken first: it owns a reference to each, so that neither a
    // sequence whose __getitem__ makes temporaries nor Python code run while the buffers are
    // taken (a __buffer__ method, a list mutated meanwhile) can free a part being read.
    nb::object items = nb::steal(PySequence_Tuple(parts.ptr()));
    if (!items.is_valid())
        throw nb::python_error();
    const std::size_t n = (std::size_t) PyTuple_GET_SIZE(items.ptr());
    std::vector<Buffer> held(n);
    std::size_t total = 0;
    std::int64_t rows = 0;
    for (std::size_t i = 0; i < n; ++i) {
        Buffer &p = held[i];
        nb::handle part = PyTuple_GET_ITEM(items.ptr(), (Py_ssize_t) i);
        if (!strict) {
            if (PyObject_GetBuffer(part.ptr(), &p.view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) {
                PyErr_Clear();
                return -1;
            }
            p.held = true;
        } else {
            get_buffer(p, part, false, ("gather(): part " + std::to_string(i)).c_str());
        }
        const char *fmt = p.view.format ? p.view.format : "B";
        bool same = out_format == fmt && p.view.itemsize == o.view.itemsize &&
                    p.view.ndim == o.view.ndim;
        for (int k = 1; same && k < o.view.ndim; ++k)
            same = p.view.shape[k] == o.view.shape[k];
        if (!same && !strict)
            return -1;
        if (!same)
            throw nb::value_error(("gather(): part " + std::to_string(i) + " must have format '" +
                                   out_format + "' and sample shape " + shape_text(o.view, 1) +
                                   " like out; got format '" + fmt + "' and shape " +
                                   shape_text(p.view, 0)).c_str());
        total += (std::size_t) p.view.len;
        rows += p.view.shape[0];
    }
    // rows counted too: with a zero-size sample shape the bytes fit whatever the rows
    const bool fits = total <= (std::size_t) o.view.len && rows <= o.view.shape[0];
    if (!fits && !strict)
        return -1;
    if (!fits)
        throw nb::value_error(("gather(): the parts hold " + std::to_string(rows) +
                               " rows, out has only " + std::to_string(o.view.shape[0])).c_str());

    auto run = [&] {
        char *dst = static_cast<char *>(o.view.buf);
        for (const Buffer &p : held) {  // memmove: a part may be a view into out itself
            std::memmove(dst, p.view.buf, (std::size_t) p.view.len);
            dst += p.view.len;
        }
        std::memset(dst, 0, (std::size_t) o.view.len - total);
    };
    if ((std::size_t) o.view.len >= kReleaseGilBytes / 4) {
        nb::gil_scoped_release release;
        run();
    } else {
        run();
    }
    return rows;
}

}  // namespace

void register_cpu_kernels(nb::module_ &m);  // cpu_kernels.cpp

// --- conv kernels, large products and the CPU thread pool (conv_kernels.cpp) ---
void register_conv_kernels(nb::module_ &m);
// ---------------------------------------------------------------------------------------------
// Recurrent layers: rnn(...) runs the time loop of one LSTM/GRU layer (rnn_kernels.cpp).
void register_rnn_kernels(nb::module_ &m);
// Row kernels of the transformer taggers: GELU, softmax(x * scale + bias), layer norm
// (row_kernels.cpp).
void register_row_kernels(nb::module_ &m);
// Index kernels of the graph taggers: top-k and reductions over trailing axes (index_kernels.cpp).
void register_index_kernels(nb::module_ &m);
// Chains of dense layers through one kernel, the intermediates in cache (dense_kernels.cpp).
void register_dense_kernels(nb::module_ &m);

NB_MODULE(_core, m) {
    m.doc() = "Native helpers for offload (aligned host buffers, pointers).";

    m.attr("ALIGNMENT") = kDefaultAlignment;

    m.def("aligned_empty", &aligned_empty, nb::arg("nbytes"),
          nb::arg("alignment") = kDefaultAlignment,
          nb::sig("def aligned_empty(nbytes: int, alignment: int = 4096) "
                  "-> numpy.ndarray"),
          "Return an uninitialised, writeable uint8 numpy array of shape "
          "(nbytes,) whose memory is allocated (malloc, aligned by hand) at the "
          "given alignment (a power of two >= 64). The memory is owned by the "
          "array (zero copy) and freed when the last reference goes away.");

    m.def("address", &address, nb::arg("array"),
          nb::sig("def address(array: object) -> int"),
          "Return the data pointer (as int) of an object that supports DLPack "
          "or the buffer protocol, without copying it.");

    nb::class_<HostBuffer>(m, "HostBuffer", nb::type_slots(hostbuffer_slots),
                           "The owner of one 4 KiB-aligned block of host memory, optionally "
                           "page-locked (registered with the CUDA runtime). Exposes the block "
                           "through the buffer protocol (typed, C-contiguous) and DLPack; the "
                           "memory lives while any array, view or DLPack consumer holds it.")
        .def(nb::init<const std::vector<std::int64_t> &, const std::string &, bool>(),
             nb::arg("shape"), nb::arg("typestr") = "|u1", nb::arg("pinned") = false,
             "Allocate an uninitialised C-contiguous block of ``shape`` elements of "
             "``typestr`` (NumPy's dtype.str, native byte order). pinned=True registers the "
             "pages with the CUDA runtime (load_cuda_runtime() first); errors name the CUDA "
             "error.")
        .def_prop_ro("address", [](const HostBuffer &b) { return (std::uintptr_t) b.ptr; },
                     "Address of the first byte (4096-aligned).")
        .def_prop_ro("nbytes", [](const HostBuffer &b) { return b.nbytes; })
        .def_prop_ro("pinned", [](const HostBuffer &b) { return b.pinned; },
                     "True when the pages are registered with the CUDA runtime.")
        .def("__dlpack__",
             [](nb::handle self, nb::kwargs kwargs) {
                 if (!nb::inst_ready(self))
                     throw nb::buffer_error("HostBuffer.__dlpack__: the HostBuffer was never "
                                            "initialised");
                 HostBuffer &b = nb::cast<HostBuffer &>(self);
                 nb::ndarray<nb::array_api> arr(b.ptr, b.dl_shape.size(), b.dl_shape.data(),
                                                self, nullptr, b.type.dtype,
                                                b.dl_device_type(), 0);
                 return nb::cast(arr).attr("__dlpack__")(**kwargs);
             },
             nb::arg("kwargs"),
             nb::sig("def __dlpack__(self, **kwargs) -> typing_extensions.CapsuleType"),
             "A DLPack capsule of the block (keyword arguments of the array API: stream, "
             "max_version, dl_device, copy); the capsule holds the owner alive.")
        .def("__dlpack_device__",
             [](const HostBuffer &b) { return nb::make_tuple(b.dl_device_type(), 0); },
             "(1, 0) for kDLCPU, or (3, 0) for kDLCUDAHost when pinned.");

    m.def("load_cuda_runtime", &load_cuda_runtime, nb::arg("candidates"),
          "Load the CUDA runtime from the first loadable library in ``candidates`` (once; "
          "later calls return the same path). Raises RuntimeError naming each failure.");

    m.def("cuda_runtime", []() -> nb::object {
              std::lock_guard<std::mutex> lock(g_cuda.mutex);
              return g_cuda.lib ? nb::cast(g_cuda.path) : nb::none();
          },
          "Path of the loaded CUDA runtime, or None.");

    m.def("unshared", [](nb::list items) -> Py_ssize_t {
              for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items.ptr()); ++i)
                  if (Py_REFCNT(PyList_GET_ITEM(items.ptr(), i)) == 1)
                      return i;
              return -1;
          },
          nb::arg("items"),
          "Index of the first item of the list that nothing but the list refers to, or -1 "
          "(exact: no interpreter-internal borrowed references blur the count).");

    m.def("copy", &copy, nb::arg("dst"), nb::arg("src"),
          "Copy src into dst (both C-contiguous host buffers of the same byte size) with one "
          "memmove; the GIL is released for copies of 64 KiB and more.");

    m.def("gather", &gather, nb::arg("out"), nb::arg("parts"), nb::arg("strict") = true,
          "Copy ``parts`` (each C-contiguous, of out's format and sample shape) back to back "
          "into ``out`` along its first axis and zero the rest, one memcpy each, with the GIL "
          "released; returns the number of rows written. A part that does not fit raises "
          "TypeError/ValueError, or with strict=False makes it return -1 with nothing written.");

    register_cpu_kernels(m);

    // --- conv kernels, large products and the CPU thread pool (conv_kernels.cpp) ---
    register_conv_kernels(m);
    register_rnn_kernels(m);
    register_row_kernels(m);
    register_index_kernels(m);
    register_dense_kernels(m);
}
