// Device discovery that is safe on machines without a driver or a GPU (the module links cudart statically).
#include <cuda_runtime.h>

#include "kernels.h"

namespace moduseg {

int cuda_device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error so later calls start clean
    return 0;
  }
  return n;
}

}  // namespace moduseg
