// The process-wide count of kernel launches behind moduseg::launched (read by engine._C.cuda_launches).
#include "cuda_utils.cuh"

namespace moduseg {

std::atomic<int64_t>& cuda_launch_counter() {
  static std::atomic<int64_t> counter{0};
  return counter;
}

}  // namespace moduseg
