// Fused float32 CPU kernels for the NumPy CPU device: the parts NumPy can only do as several
// passes over memory (bias + residual + activation epilogues, row softmax) and small matrix
// products whose cost is all call overhead (batch-1 MLPs). Large products stay with NumPy's BLAS.
//
// Every entry point checks shapes, releases the GIL, and writes only into `out`/`y`.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "checks.h"
#include "pool.h"

namespace nb = nanobind;

namespace {

using In = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using Out = nb::ndarray<float, nb::c_contig, nb::device::cpu>;

// Same codes as offload/drivers/cpu.py ACTIVATION_CODES.
enum Activation : int { kIdentity = 0, kRelu, kLeakyRelu, kSigmoid, kTanh, kClip };

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define OFFLOAD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define OFFLOAD_CLONES
#endif

struct Epilogue {
    int act;
    float alpha, lo, hi;

    inline void apply(float *row, std::int64_t n) const {
        switch (act) {
        case kRelu:
            for (std::int64_t j = 0; j < n; ++j) row[j] = row[j] > 0.f ? row[j] : (row[j] != row[j] ? row[j] : 0.f);
            break;
        case kLeakyRelu:
            for (std::int64_t j = 0; j < n; ++j) row[j] = row[j] >= 0.f ? row[j] : row[j] * alpha;
            break;
        case kSigmoid:
            for (std::int64_t j = 0; j < n; ++j) row[j] = 1.f / (1.f + std::exp(-row[j]));
            break;
        case kTanh:
            for (std::int64_t j = 0; j < n; ++j) row[j] = std::tanh(row[j]);
            break;
        case kClip:
            for (std::int64_t j = 0; j < n; ++j) row[j] = row[j] != row[j] ? row[j] : std::min(std::max(row[j], lo), hi);
            break;
        default:
            break;
        }
    }
};


// The activation code and its parameters, checked (an unknown code would silently be identity).
Epilogue make_epilogue(const char *fn, int act, float alpha, float lo, float hi) {
    OFFLOAD_CHECK(act >= kIdentity && act <= kClip, std::string(fn) + ": activation code must be 0..5, got " +
                                                std::to_string(act));
    return Epilogue{act, alpha, lo, hi};
}

using offload::check_apart;
using offload::shape_of;

OFFLOAD_CLONES
void dense_rows(const float *x, const float *w, const float *bias, const float *residual,
                float *y, std::int64_t m, std::int64_t k, std::int64_t n, Epilogue e) {
    for (std::int64_t i = 0; i < m; ++i) {
        float *row = y + i * n;
        if (bias) std::copy(bias, bias + n, row); else std::fill(row, row + n, 0.f);
        const float *xi = x + i * k;
        for (std::int64_t p = 0; p < k; ++p) {
            const float a = xi[p];
            const float *wp = w + p * n;
            for (std::int64_t j = 0; j < n; ++j) row[j] += a * wp[j];
        }
        if (residual) {
            const float *r = residual + i * n;
            for (std::int64_t j = 0; j < n; ++j) row[j] += r[j];
        }
        e.apply(row, n);
    }
}

// y[m, n] = act(x[m, k] @ w[k, n] + bias[n] + residual[m, n]); for small products.
void dense(In x, In w, std::optional<In> bias, std::optional<In> residual, Out y, int act,
           float alpha, float lo, float hi) {
    OFFLOAD_CHECK(x.ndim() == 2 && w.ndim() == 2 && y.ndim() == 2, "dense: expected 2-D x, w and out");
    const std::int64_t m = x.shape(0), k = x.shape(1), n = w.shape(1);
    OFFLOAD_CHECK(w.shape(0) == (size_t) k && y.shape(0) == (size_t) m && y.shape(1) == (size_t) n,
          "dense: x " + shape_of(x) + " @ w " + shape_of(w) + " does not fit out " + shape_of(y));
    OFFLOAD_CHECK(!bias || bias->size() == (size_t) n, "dense: bias must have " + std::to_string(n) + " values");
    OFFLOAD_CHECK(!residual || (residual->size() == (size_t) (m * n)), "dense: residual must be [m, n]");
    const Epilogue e = make_epilogue("dense", act, alpha, lo, hi);
    check_apart("dense", "x", y, x);
    check_apart("dense", "w", y, w);
    if (bias) check_apart("dense", "bias", y, *bias);
    if (residual) check_apart("dense", "residual", y, *residual);
    nb::gil_scoped_release release;
    offload::FlushDenormals ftz;
    dense_rows(x.data(), w.data(), bias ? bias->data() : nullptr,
               residual ? residual->data() : nullptr, y.data(), m, k, n, e);
}

OFFLOAD_CLONES
void epilogue_rows(float *y, const float *bias, std::int64_t nbias, int bias_axis,
                   const float *residual, std::int64_t rows, std::int64_t cols, Epilogue e) {
    for (std::int64_t i = 0; i < rows; ++i) {
        float *row = y + i * cols;
        if (bias && bias_axis == 0) {
            const float b = bias[i % nbias];
            for (std::int64_t j = 0; j < cols; ++j) row[j] += b;
        } else if (bias) {
            for (std::int64_t j = 0; j < cols; ++j) row[j] += bias[j];
        }
        if (residual) {
            const float *r = residual + i * cols;
            for (std::int64_t j = 0; j < cols; ++j) row[j] += r[j];
        }
        e.apply(row, cols);
    }
}

// In place on y viewed as [rows, cols]: add bias (bias_axis 0: one value per row, cycling, as a
// conv's per-channel bias over [N*C, H*W]; 1: one per column), add residual, apply activation.
void epilogue(Out y, std::optional<In> bias, int bias_axis, std::optional<In> residual, int act,
              float alpha, float lo, float hi) {
    OFFLOAD_CHECK(y.ndim() == 2, "epilogue: expected a 2-D view of the output");
    OFFLOAD_CHECK(bias_axis == 0 || bias_axis == 1, "epilogue: bias_axis must be 0 or 1, got " +
                                                std::to_string(bias_axis));
    const std::int64_t rows = y.shape(0), cols = y.shape(1);
    std::int64_t nbias = 0;
    if (bias) {
        nbias = (std::int64_t) bias->size();
        OFFLOAD_CHECK(nbias > 0 && (bias_axis == 0 ? rows % nbias == 0 : nbias == cols),
              "epilogue: " + std::to_string(nbias) + " bias values do not fit output [" +
                  std::to_string(rows) + ", " + std::to_string(cols) + "]");
    }
    OFFLOAD_CHECK(!residual || residual->size() == (size_t) (rows * cols),
          "epilogue: residual must have the output's size");
    const Epilogue e = make_epilogue("epilogue", act, alpha, lo, hi);
    if (bias) check_apart("epilogue", "bias", y, *bias);
    if (residual) check_apart("epilogue", "residual", y, *residual);
    nb::gil_scoped_release release;
    offload::FlushDenormals ftz;
    epilogue_rows(y.data(), bias ? bias->data() : nullptr, nbias, bias_axis,
                  residual ? residual->data() : nullptr, rows, cols, e);
}

OFFLOAD_CLONES
void softmax_rows(const float *x, float *y, std::int64_t rows, std::int64_t cols) {
    for (std::int64_t i = 0; i < rows; ++i) {
        const float *xi = x + i * cols;
        float *yi = y + i * cols;
        float mx = -INFINITY;
        bool nan = false;
        for (std::int64_t j = 0; j < cols; ++j) {
            nan |= xi[j] != xi[j];
            mx = std::max(mx, xi[j]);
        }
        if (nan) {
            std::fill(yi, yi + cols, NAN);
            continue;
        }
        float sum = 0.f;
        for (std::int64_t j = 0; j < cols; ++j) {
            yi[j] = std::exp(xi[j] - mx);
            sum += yi[j];
        }
        const float inv = 1.f / sum;
        for (std::int64_t j = 0; j < cols; ++j) yi[j] *= inv;
    }
}

// Softmax over the last axis of x viewed as [rows, cols].
void softmax(In x, Out y) {
    OFFLOAD_CHECK(x.ndim() >= 1 && x.size() == y.size(), "softmax: x and out must have the same size");
    check_apart("softmax", "x", y, x, /*same_ok=*/true);
    const std::int64_t cols = x.shape(x.ndim() - 1);
    const std::int64_t rows = cols ? (std::int64_t) x.size() / cols : 0;
    nb::gil_scoped_release release;
    offload::FlushDenormals ftz;
    softmax_rows(x.data(), y.data(), rows, cols);
}


// y[n, m, :] = act(prod[m, n, :] + bias[m] + residual[n, m, :]): a batch-folded GEMM's output
// back to NCHW with the fused epilogue, in one pass.
void conv_epilogue(In prod, Out y, std::optional<In> bias, std::optional<In> residual, int act,
                   float alpha, float lo, float hi) {
    OFFLOAD_CHECK(prod.ndim() == 3 && y.ndim() == 3, "conv_epilogue: expected prod [M, N, HW], y [N, M, HW]");
    const std::int64_t m = prod.shape(0), n = prod.shape(1), hw = prod.shape(2);
    OFFLOAD_CHECK(y.shape(0) == (size_t) n && y.shape(1) == (size_t) m && y.shape(2) == (size_t) hw,
          "conv_epilogue: y must be [N, M, HW] for prod [M, N, HW]");
    OFFLOAD_CHECK(!bias || bias->size() == (size_t) m, "conv_epilogue: bias must have M values");
    OFFLOAD_CHECK(!residual || residual->size() == y.size(), "conv_epilogue: residual must match y");
    const Epilogue e = make_epilogue("conv_epilogue", act, alpha, lo, hi);
    check_apart("conv_epilogue", "prod", y, prod);
    if (bias) check_apart("conv_epilogue", "bias", y, *bias);
    if (residual) check_apart("conv_epilogue", "residual", y, *residual);
    const float *p = prod.data(), *b = bias ? bias->data() : nullptr;
    const float *r = residual ? residual->data() : nullptr;
    float *out = y.data();
    nb::gil_scoped_release release;
    offload::FlushDenormals ftz;
    for (std::int64_t s = 0; s < n; ++s)
        for (std::int64_t ch = 0; ch < m; ++ch) {
            float *o = out + (s * m + ch) * hw;
            const float *q = p + (ch * n + s) * hw;
            const float add = b ? b[ch] : 0.f;
            for (std::int64_t k = 0; k < hw; ++k) o[k] = q[k] + add;
            if (r) {
                const float *rr = r + (s * m + ch) * hw;
                for (std::int64_t k = 0; k < hw; ++k) o[k] += rr[k];
            }
            e.apply(o, hw);
        }
}

// A sequence of small dense and softmax ops run by one call: for batch-1 MLPs the cost of a
// call is the whole cost, so a plan's consecutive small ops are gathered here once and run
// together. The program holds every array it was given (nb::ndarray keeps its owner alive), so
// run() never reads memory that was freed; the arrays are taken as they are (no conversion:
// a converted copy would be a temporary, and the program would compute on a stale copy).
// A mutex keeps add_* from growing the list while another thread runs it (without the GIL).
class Program {
  public:
    void add_dense(In x, In w, std::optional<In> bias, std::optional<In> residual, Out y, int act,
                   float alpha, float lo, float hi) {
        OFFLOAD_CHECK(x.ndim() == 2 && w.ndim() == 2 && y.ndim() == 2,
              "Program.add_dense: expected 2-D x, w and out, got x " + shape_of(nb::ndarray<>(x.handle())) +
                  ", w " + shape_of(nb::ndarray<>(w.handle())) + ", out " +
                  shape_of(nb::ndarray<>(y.handle())));
        const std::int64_t m = x.shape(0), k = x.shape(1), n = w.shape(1);
        OFFLOAD_CHECK(w.shape(0) == (size_t) k && y.shape(0) == (size_t) m && y.shape(1) == (size_t) n,
              "Program.add_dense: x " + shape_of(nb::ndarray<>(x.handle())) + " @ w " +
                  shape_of(nb::ndarray<>(w.handle())) + " does not fit out " +
                  shape_of(nb::ndarray<>(y.handle())));
        OFFLOAD_CHECK(!bias || bias->size() == (size_t) n, "Program.add_dense: bias must have n values");
        OFFLOAD_CHECK(!residual || residual->size() == y.size(), "Program.add_dense: bad residual");
        const Epilogue e = make_epilogue("Program.add_dense", act, alpha, lo, hi);
        check_apart("Program.add_dense", "x", y, x);
        check_apart("Program.add_dense", "w", y, w);
        if (bias) check_apart("Program.add_dense", "bias", y, *bias);
        if (residual) check_apart("Program.add_dense", "residual", y, *residual);
        Op op{kDense, x, w, bias.value_or(In()), residual.value_or(In()), y, m, k, n, e};
        std::lock_guard<std::mutex> lock(mutex_);
        ops_.push_back(std::move(op));
    }
    void add_softmax(In x, Out y) {
        OFFLOAD_CHECK(x.ndim() >= 1 && x.size() == y.size(), "Program.add_softmax: x " +
                                                         shape_of(nb::ndarray<>(x.handle())) +
                                                         " and out " +
                                                         shape_of(nb::ndarray<>(y.handle())) +
                                                         " must have the same size");
        check_apart("Program.add_softmax", "x", y, x, /*same_ok=*/true);
        const std::int64_t cols = x.shape(x.ndim() - 1);
        Op op{kSoftmax, x, In(), In(), In(), y, cols ? (std::int64_t) x.size() / cols : 0, 0,
              cols, Epilogue{0, 0, 0, 0}};
        std::lock_guard<std::mutex> lock(mutex_);
        ops_.push_back(std::move(op));
    }
    void run() {  // called without the GIL: touches only raw data, never the handles' counts
        std::lock_guard<std::mutex> lock(mutex_);
        offload::FlushDenormals ftz;
        for (const Op &op : ops_) {
            if (op.kind == kDense)
                dense_rows(op.x.data(), op.w.data(), op.b.is_valid() ? op.b.data() : nullptr,
                           op.r.is_valid() ? op.r.data() : nullptr, op.y.data(), op.m, op.k,
                           op.n, op.e);
            else
                softmax_rows(op.x.data(), op.y.data(), op.m, op.n);
        }
    }
    size_t size() {
        std::lock_guard<std::mutex> lock(mutex_);
        return ops_.size();
    }

  private:
    enum Kind { kDense, kSoftmax };
    struct Op {
        Kind kind;
        In x, w, b, r;  // b, r: invalid (empty) when absent
        Out y;
        std::int64_t m, k, n;
        Epilogue e;
    };
    std::mutex mutex_;
    std::vector<Op> ops_;
};

}  // namespace

void register_cpu_kernels(nb::module_ &m) {
    m.def("dense", &dense, nb::arg("x"), nb::arg("w"), nb::arg("bias").none(),
          nb::arg("residual").none(), nb::arg("out").noconvert(), nb::arg("act"), nb::arg("alpha"),
          nb::arg("lo"), nb::arg("hi"),
          "out = act(x @ w + bias + residual) for float32 C-contiguous 2-D arrays (small sizes).");
    m.def("epilogue", &epilogue, nb::arg("y").noconvert(), nb::arg("bias").none(), nb::arg("bias_axis"),
          nb::arg("residual").none(), nb::arg("act"), nb::arg("alpha"), nb::arg("lo"),
          nb::arg("hi"), "In place: y = act(y + bias + residual), y viewed as [rows, cols].");
    m.def("conv_epilogue", &conv_epilogue, nb::arg("prod"), nb::arg("y").noconvert(),
          nb::arg("bias").none(), nb::arg("residual").none(), nb::arg("act"), nb::arg("alpha"),
          nb::arg("lo"), nb::arg("hi"), "y[n, m] = act(prod[m, n] + bias[m] + residual[n, m]).");
    nb::class_<Program>(m, "Program", "Small dense/softmax ops run in order by one call.")
        .def(nb::init<>())
        .def("add_dense", &Program::add_dense, nb::arg("x").noconvert(), nb::arg("w").noconvert(),
             nb::arg("bias").noconvert().none(), nb::arg("residual").noconvert().none(),
             nb::arg("out").noconvert(), nb::arg("act"), nb::arg("alpha"), nb::arg("lo"),
             nb::arg("hi"))
        .def("add_softmax", &Program::add_softmax, nb::arg("x").noconvert(),
             nb::arg("out").noconvert())
        .def("run", &Program::run, nb::call_guard<nb::gil_scoped_release>())
        .def("__len__", &Program::size);
    m.def("softmax", &softmax, nb::arg("x"), nb::arg("out").noconvert(), "Softmax over the last axis.");
}
