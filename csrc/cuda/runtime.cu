// What the module was built against and what the machine's driver supports, so the Python side
// can refuse a driver too old for the statically linked runtime with a clear message instead of
// failing on the first kernel launch.
#include <cuda_runtime.h>

#include "cuda/kernels.h"

namespace pyserve::cuda {

std::pair<int, int> versions() {
  int driver = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;  // no driver at all
  return {CUDART_VERSION, driver};
}

}  // namespace pyserve::cuda
