// The Python module mingpt._C. Ops register themselves with the torch library (TORCH_LIBRARY_FRAGMENT
// in their own files); this file reports how the extension was built and binds the sampler class and
// the memory-read benchmark.
#include <torch/extension.h>

#include "openmp.h"
#include "sampler/sampler.h"

void init_stream_read(pybind11::module& m);

namespace {

py::dict build_info() {
  py::dict info;
#ifdef _OPENMP
  info["openmp"] = true;
  info["omp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
#endif
#ifdef MINGPT_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["torch_version"] = TORCH_VERSION;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mingpt compiled kernels";
  m.def("build_info", &build_info, "How this extension was compiled (OpenMP, CUDA, torch version)");
  init_sampler(m);
  init_stream_read(m);
}
