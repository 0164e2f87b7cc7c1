// pybind11 bindings of `probes._C`, the only CPU file that knows the binding layer: numpy
// buffers in, validated here, raw pointers to the kernels (gram_cpu.cpp, neurons_cpu.cpp),
// never torch. Errors are std::invalid_argument, i.e. ValueError in Python. The GIL is released
// while a kernel runs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cpu_kernels.h"

namespace py = pybind11;
using probes_cpu::InKind;

namespace {

[[noreturn]] void bad(const std::string &what) { throw std::invalid_argument(what); }

double *f64_out(const py::array &a, const char *name, std::initializer_list<int64_t> shape) {
  const std::string n(name);
  if (!py::isinstance<py::array_t<double>>(a) || a.dtype().kind() != 'f' || a.itemsize() != 8)
    bad(n + " must be a float64 array");
  if (!(a.flags() & py::array::c_style)) bad(n + " must be C-contiguous");
  if (!a.writeable()) bad(n + " must be writeable");
  if (a.ndim() != ssize_t(shape.size())) bad(n + " has the wrong number of dimensions");
  int i = 0;
  for (int64_t s : shape)
    if (a.shape(i++) != s) bad(n + " has the wrong shape");
  return static_cast<double *>(const_cast<void *>(a.data()));
}

InKind input_kind(const py::array &X) {
  const char kind = X.dtype().kind();
  if (kind == 'f' && X.itemsize() == 2) return InKind::F16;
  if (kind == 'f' && X.itemsize() == 4) return InKind::F32;
  if (kind == 'f' && X.itemsize() == 8) return InKind::F64;
  bad("X must be float16, float32 or float64");
}

// fold ids (r,) int32 in [-1, F), or null when None (then F must be 1). `keep` holds the array.
const int32_t *fold_ids(const py::object &fold, int64_t r, int64_t F, py::array &keep) {
  if (fold.is_none()) {
    if (F != 1) bad("fold ids are required when F > 1");
    return nullptr;
  }
  keep = fold.cast<py::array>();
  if (keep.dtype().kind() != 'i' || keep.itemsize() != 4 || keep.ndim() != 1 ||
      keep.shape(0) != r || !(keep.flags() & py::array::c_style))
    bad("fold must be a C-contiguous int32 array of shape (r,)");
  const int32_t *f = static_cast<const int32_t *>(keep.data());
  for (int64_t t = 0; t < r; ++t)
    if (f[t] < -1 || f[t] >= F)
      bad("fold id " + std::to_string(f[t]) + " at row " + std::to_string(t) + " outside [-1, F)");
  return f;
}

void gram_update(py::array X, py::array Y, py::object fold, py::array shift, py::array n,
                 py::array sx, py::array xtx, py::array sy, py::array yty, py::array xty,
                 bool float64, int64_t block_rows) {
  if (X.ndim() != 3) bad("X must be (B, r, d)");
  if (!(X.flags() & py::array::c_style)) bad("X must be C-contiguous");
  probes_cpu::GramProblem P{};
  P.kind = input_kind(X);
  P.X = X.data();
  P.B = X.shape(0);
  P.r = X.shape(1);
  P.d = X.shape(2);
  if (Y.ndim() != 2 || Y.shape(0) != P.r) bad("Y must be (r, k)");
  P.k = Y.shape(1);
  if (n.ndim() != 1) bad("n must be (F,)");
  P.F = n.shape(0);
  if (P.B < 1 || P.d < 1 || P.k < 1 || P.F < 1) bad("B, d, k and F must be >= 1");
  if (!py::isinstance<py::array_t<double>>(Y) || Y.itemsize() != 8 || !(Y.flags() & py::array::c_style))
    bad("Y must be a C-contiguous float64 array");
  P.Y = static_cast<const double *>(Y.data());
  py::array fold_arr;
  P.fold = fold_ids(fold, P.r, P.F, fold_arr);
  if (!py::isinstance<py::array_t<double>>(shift) || shift.itemsize() != 8 || shift.ndim() != 2 ||
      shift.shape(0) != P.B || shift.shape(1) != P.d || !(shift.flags() & py::array::c_style))
    bad("shift must be a C-contiguous float64 array of shape (B, d)");
  P.shift = static_cast<const double *>(shift.data());
  const int64_t B = P.B, F = P.F, d = P.d, k = P.k;
  P.n = f64_out(n, "n", {F});
  P.sx = f64_out(sx, "sx", {B, F, d});
  P.xtx = f64_out(xtx, "xtx", {B, F, d, d});
  P.sy = f64_out(sy, "sy", {F, k});
  P.yty = f64_out(yty, "yty", {F, k, k});
  P.xty = f64_out(xty, "xty", {B, F, d, k});
  P.block_rows = block_rows;
  py::gil_scoped_release nogil;
  probes_cpu::gram_update(P, float64);
}

py::tuple neuron_moments(py::array_t<uint16_t, py::array::c_style> X,
                         py::array_t<double, py::array::c_style> Y,
                         py::array_t<int32_t, py::array::c_style> fold,
                         py::array_t<float, py::array::c_style> shift) {
  if (X.ndim() != 3) bad("X must be (B, r, m) float16 bits (uint16)");
  const int64_t B = X.shape(0), r = X.shape(1), m = X.shape(2);
  if (Y.ndim() != 2 || Y.shape(0) != r)
    bad("Y must be (r, k) float64 with r = " + std::to_string(r));
  const int64_t k = Y.shape(1);
  if (fold.ndim() != 1 || fold.shape(0) != r)
    bad("fold must be (r,) int32 with r = " + std::to_string(r));
  if (shift.ndim() != 2 || shift.shape(0) != B || shift.shape(1) != m)
    bad("shift must be (B, m) float32");
  py::array_t<double> sx({B, m}), sxx({B, m}), sxy({B, m, k});
  {
    py::gil_scoped_release nogil;
    probes_cpu::neuron_moments(X.data(), B, r, m, Y.data(), k, fold.data(), shift.data(),
                               sx.mutable_data(), sxx.mutable_data(), sxy.mutable_data());
  }
  return py::make_tuple(sx, sxx, sxy);
}

template <typename T>
py::array centre_into(const py::array &X, const py::array &mean, const py::object &out,
                      const py::object &rows) {
  const char *type = sizeof(T) == 4 ? "float32" : "float64";
  const int64_t B = X.shape(0), d = X.shape(2);
  const int64_t *idx = nullptr;
  py::array_t<int64_t, py::array::c_style> rows_a;
  if (!rows.is_none()) {
    rows_a = rows.cast<py::array_t<int64_t, py::array::c_style>>();
    if (rows_a.ndim() != 1) bad("rows must be a 1-D int64 array of row indices");
    idx = rows_a.data();
    for (int64_t i = 0; i < rows_a.shape(0); ++i)
      if (idx[i] < 0 || idx[i] >= X.shape(1))
        bad("rows holds " + std::to_string(idx[i]) + ", outside X's " +
            std::to_string(X.shape(1)) + " rows");
  }
  const int64_t r = idx ? rows_a.shape(0) : X.shape(1);
  if (!(mean.flags() & py::array::c_style) || mean.ndim() != 2 || mean.shape(0) != B ||
      mean.shape(1) != d)
    bad(std::string("mean must be C-contiguous (B, d) with B, d = ") + std::to_string(B) + ", " +
        std::to_string(d));
  // a caller's buffer, reused across chunks, spares the page faults of a fresh array
  py::array o = out.is_none() ? py::array_t<T>({B, r, d}) : out.cast<py::array>();
  if (!py::isinstance<py::array_t<T>>(o) || o.dtype().kind() != 'f' || o.itemsize() != sizeof(T) ||
      !(o.flags() & py::array::c_style) || !o.writeable() || o.ndim() != 3 || o.shape(0) != B ||
      o.shape(1) != r || o.shape(2) != d)
    bad(std::string("out must be a writeable C-contiguous ") + type +
        " array (B, rows, d) of X's layers and width");
  const auto *x = static_cast<const uint16_t *>(X.data());
  const int64_t sb = X.strides(0) / 2, sr = X.strides(1) / 2;
  const auto *m = static_cast<const T *>(mean.data());
  auto *dst = static_cast<T *>(o.mutable_data());
  {
    py::gil_scoped_release nogil;
    probes_cpu::centre_f16(x, B, r, d, sb, sr, idx, m, dst);
  }
  return o;
}

py::array centre_f16(py::array X, py::array mean, py::object out, py::object rows) {
  if (X.ndim() != 3 || X.dtype().kind() != 'f' || X.itemsize() != 2)
    bad("X must be a float16 array (B, r, d)");
  if (X.strides(2) != 2 || X.strides(0) % 2 || X.strides(1) % 2)
    bad("X's rows must be contiguous (its last stride one element)");
  if (mean.dtype().kind() == 'f' && mean.itemsize() == 4)
    return centre_into<float>(X, mean, out, rows);
  if (mean.dtype().kind() == 'f' && mean.itemsize() == 8)
    return centre_into<double>(X, mean, out, rows);
  bad("mean must be float32 or float64 (the output's type)");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "probes CPU kernels (C++/OpenMP): the fused Gram pass, neuron moments, fp16 centring";
#ifdef ACTSTORE_OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  m.def("gram_update", &gram_update, py::arg("X"), py::arg("Y"), py::arg("fold"), py::arg("shift"),
        py::arg("n"), py::arg("sx"), py::arg("xtx"), py::arg("sy"), py::arg("yty"), py::arg("xty"),
        py::arg("float64") = false, py::arg("block_rows") = 2048,
        "Add one chunk into float64 statistics, in place.\n"
        "X (B, r, d) float16/32/64 C-contiguous; Y (r, k) float64; fold (r,) int32 in [-1, F) or None;\n"
        "shift (B, d) float64; outputs n (F,), sx (B, F, d), xtx (B, F, d, d), sy (F, k), yty (F, k, k),\n"
        "xty (B, F, d, k), all float64 C-contiguous. float64=False sums blocks of <= block_rows rows\n"
        "in float32 (x - float32(shift)) before adding into the float64 totals; True uses double.");
  m.def("gram_kernel", &probes_cpu::gram_kernel, py::arg("float64") = false,
        "The micro-kernel gram_update runs in that mode on this CPU: 'avx2-float', 'avx2-double',\n"
        "'avx512-float' or 'avx512-double' (AVX-512 CPUs, unless the environment sets\n"
        "PROBES_CPU_ISA=avx2).");
  m.def("neuron_moments", &neuron_moments, py::arg("X"), py::arg("Y"), py::arg("fold"),
        py::arg("shift"),
        "Per-neuron Σ(x-c), Σ(x-c)², Σ(x-c)y over rows with fold >= 0; X (B, r, m) float16 as "
        "uint16 bits, Y (r, k) float64, fold (r,) int32, shift (B, m) float32. Returns float64 "
        "(sx (B, m), sxx (B, m), sxy (B, m, k)).");
  m.def("centre_f16", &centre_f16, py::arg("X"), py::arg("mean"), py::arg("out") = py::none(),
        py::arg("rows") = py::none(),
        "X - mean[b] for X (B, r, d) float16 (rows contiguous, any row and layer strides) and mean\n"
        "(B, d) float32 or float64, in mean's type, into out (a C-contiguous (B, r, d) array of that\n"
        "type) or a new one; rows (int64 indices, optional): only those rows of X, in that order.");
}
