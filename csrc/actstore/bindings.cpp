// pybind11 entry of `actstore._native`, the only file here that knows the binding layer: the
// fp16 overflow scan the extractor runs on every batch and the crc32c of a store's row blocks.
// The probe kernels are in probes._C.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cerrno>

#include "crc32c.h"
#include "fp16_scan.h"
#include "pread_crc.h"

namespace py = pybind11;

PYBIND11_MODULE(_native, m) {
  m.doc() = "actstore native helpers (C++/OpenMP): the fp16 overflow scan, crc32c";
#ifdef ACTSTORE_OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  m.def(
      "find_fp16_overflow",
      [](py::array_t<float, py::array::c_style> arr) {
        const float *x = arr.data();
        const int64_t n = arr.size();
        py::gil_scoped_release nogil;
        return actstore_native::find_fp16_overflow(x, n);
      },
      py::arg("x"),
      "Flat index of the first element of a C-contiguous float32 array that float16 cannot\n"
      "represent (|x| > 65504, inf or NaN), or -1 if every value fits.");
  m.def(
      "crc32c",
      [](py::buffer data, uint32_t crc, bool portable) {
        // any C-contiguous buffer (bytes, a numpy array, a memoryview), read in place
        py::buffer_info info = data.request();
        {
          int64_t expect = info.itemsize;
          for (int64_t k = info.ndim - 1; k >= 0; --k) {
            if (info.shape[k] > 1 && info.strides[k] != expect)
              throw py::value_error("crc32c needs a C-contiguous buffer");
            expect *= info.shape[k];
          }
        }
        const auto *p = static_cast<const uint8_t *>(info.ptr);
        const size_t n = static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
        py::gil_scoped_release nogil;
        return actstore_native::crc32c(p, n, crc, portable);
      },
      py::arg("data"), py::arg("crc") = 0, py::arg("portable") = false,
      "crc32c (Castagnoli, as zarr's codec and google_crc32c) of a C-contiguous buffer's bytes;\n"
      "``crc``: a previous result, to continue over a concatenation; ``portable``: the table-driven\n"
      "loop even where the CPU has crc32 instructions (tests compare the two).");
  m.def("crc32c_combine", &actstore_native::crc32c_combine, py::arg("crc_a"), py::arg("crc_b"),
        py::arg("len_b"), "crc32c of A followed by B, from crc32c(A), crc32c(B) and len(B).");
  m.def(
      "pread_crc",
      [](int fd, int64_t offset, py::list buffers) {
        // writable C-contiguous buffers (numpy arrays), filled in order from the file
        std::vector<py::buffer_info> infos;
        std::vector<actstore_native::Span> spans;
        for (py::handle h : buffers) {
          infos.push_back(py::reinterpret_borrow<py::buffer>(h).request(true));
          const py::buffer_info &info = infos.back();
          int64_t expect = info.itemsize;
          for (int64_t k = info.ndim - 1; k >= 0; --k) {
            if (info.shape[k] > 1 && info.strides[k] != expect)
              throw py::value_error("pread_crc needs C-contiguous buffers");
            expect *= info.shape[k];
          }
          spans.push_back({static_cast<uint8_t *>(info.ptr),
                           static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize)});
        }
        actstore_native::ReadCrc r;
        {
          py::gil_scoped_release nogil;
          r = actstore_native::pread_crc(fd, offset, spans);
        }
        if (r.error != 0) {
          errno = r.error;
          PyErr_SetFromErrno(PyExc_OSError);
          throw py::error_already_set();
        }
        return py::make_tuple(r.got, r.crcs);
      },
      py::arg("fd"), py::arg("offset"), py::arg("buffers"),
      "Read file ``fd`` from ``offset`` into the writable C-contiguous ``buffers`` one after\n"
      "another; returns (bytes read, [crc32c of each buffer]). The caller reads while a helper\n"
      "thread checksums. Fewer bytes than the buffers hold: the file ended.");
}
