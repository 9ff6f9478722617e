// Error checking and stream-ordered scratch for the CUDA kernels: every failure becomes a C++ exception (pybind11
// turns it into a Python RuntimeError) naming the call that failed.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace moduseg {

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(err));
}

#define MODUSEG_CUDA_CHECK(call) ::moduseg::cuda_check((call), #call)

// One stream-ordered allocation carved into aligned pieces; released on the stream when it goes out of scope.
class StreamScratch {
 public:
  explicit StreamScratch(cudaStream_t stream) : stream_(stream) {}
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
  ~StreamScratch() {
    if (base_) cudaFreeAsync(base_, stream_);
  }

  // Reserves `bytes`, returns its offset; call allocate() once every piece is reserved.
  size_t reserve(size_t bytes) {
    const size_t offset = size_;
    size_ += (bytes + 255) / 256 * 256;
    return offset;
  }
  void allocate() {
    if (size_ == 0) size_ = 256;
    MODUSEG_CUDA_CHECK(cudaMallocAsync(&base_, size_, stream_));
  }
  template <typename T>
  T* at(size_t offset) const {
    return reinterpret_cast<T*>(static_cast<char*>(base_) + offset);
  }

 private:
  cudaStream_t stream_;
  void* base_ = nullptr;
  size_t size_ = 0;
};

}  // namespace moduseg
