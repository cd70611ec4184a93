// pybind11 bindings of the CUDA kernels (module pyserve._C_cuda). Kept apart from pyserve._C so a
// machine without a GPU driver never loses the CPU kernels. Arguments are device addresses and
// sizes that pyserve/kernels/cuda.py has checked; `stream` is torch's current CUDA stream.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "denoise_coef.h"
#include "cuda/kernels.h"

namespace py = pybind11;

PYBIND11_MODULE(_C_cuda, m) {
  {
    pybind11::dict coef;  // the denoise coefficient table's columns (denoise_coef.h)
    for (const auto& entry : pyserve::kDenoiseCoefNames) coef[entry.name] = entry.column;
    m.attr("DENOISE_COEF") = coef;
  }
  m.doc() = "pyserve CUDA kernels (fp32, fp16, bf16)";
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("write_kv", &pyserve::cuda::write_kv, nogil);
  m.def("paged_attention", &pyserve::cuda::paged_attention, nogil);
  m.def("dense_attention", &pyserve::cuda::dense_attention, nogil);
  m.def("varlen_attention", &pyserve::cuda::varlen_attention, nogil);
  m.def("quantized_linear", &pyserve::cuda::quantized_linear, nogil);
  m.def("lora", &pyserve::cuda::lora, nogil);
  m.def("sample", &pyserve::cuda::sample, nogil);
  m.def("denoise_step", &pyserve::cuda::denoise_step, nogil);
  m.def("versions", &pyserve::cuda::versions);
}
