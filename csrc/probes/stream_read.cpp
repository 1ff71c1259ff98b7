// mingpt._C.stream_read: one read of a buffer by a team of OpenMP threads, each streaming its share with
// vector loads as the sampler streams its weight panels. Timed over a buffer of a weight format's
// bytes, it is the streaming bound of a decode step in that format (mingpt.bench).
#include <torch/extension.h>

#include "openmp.h"
#include "simd.h"

namespace {

double stream_read(const torch::Tensor& buffer, int64_t num_threads) {
  TORCH_CHECK_TYPE(buffer.scalar_type() == torch::kFloat, "stream_read: buffer must be float32");
  TORCH_CHECK_VALUE(buffer.device().is_cpu() && buffer.is_contiguous(), "stream_read: buffer must be a contiguous "
                    "CPU tensor");
  TORCH_CHECK_VALUE(num_threads >= 1 && num_threads <= 1024, "stream_read: num_threads must be in [1, 1024]");
  constexpr int64_t kChunk = 64;  // floats per share unit: four vectors
  const float* data = buffer.data_ptr<float>();
  const int64_t n = buffer.numel(), chunks = n / kChunk;
  double total = 0.0;
  pybind11::gil_scoped_release release;
#pragma omp parallel num_threads(int(num_threads)) reduction(+ : total)
  {
    const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t first = chunks * tid / nth, last = chunks * (tid + 1) / nth;
    total += mingpt::sum_padded<mingpt::vec16>(data + first * kChunk, (last - first) * kChunk);
    if (tid == 0)
      for (int64_t i = chunks * kChunk; i < n; ++i) total += data[i];
  }
  return total;
}

}  // namespace

void init_stream_read(pybind11::module& m) {
  m.def("stream_read", &stream_read, pybind11::arg("buffer"), pybind11::arg("num_threads"),
        "Sum of a float32 buffer, read once by num_threads OpenMP threads (a memory-read benchmark)");
}
