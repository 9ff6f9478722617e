// What every CUDA launcher needs: error checks that throw (no exit, no sync), the image table as a kernel parameter,
// scratch on the caller's stream (stream-ordered allocation: freed when the stream reaches it, no host sync), a
// thread-block Team for the shared bodies, and a count of kernel launches (moduseg::cuda_launches) that tests read
// to show the launches per batch do not grow with images or regions.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "host_device.h"

namespace moduseg {

std::atomic<int64_t>& cuda_launch_counter();

inline void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(status));
}

// After a kernel launch: a bad configuration is reported at once (no synchronisation), and the launch is counted.
inline void launched(const char* kernel) {
  cuda_check(cudaGetLastError(), kernel);
  cuda_launch_counter().fetch_add(1, std::memory_order_relaxed);
}

// Device memory for the duration of one launcher call, allocated and freed in stream order.
class StreamBuffer {
 public:
  StreamBuffer(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes) cuda_check(cudaMallocAsync(&data_, bytes, stream), "cudaMallocAsync");
  }
  ~StreamBuffer() {
    if (data_) cudaFreeAsync(data_, stream_);
  }
  StreamBuffer(StreamBuffer&& other) noexcept : data_(other.data_), stream_(other.stream_) { other.data_ = nullptr; }
  StreamBuffer(const StreamBuffer&) = delete;
  StreamBuffer& operator=(const StreamBuffer&) = delete;
  StreamBuffer& operator=(StreamBuffer&&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }

 private:
  void* data_ = nullptr;
  cudaStream_t stream_;
};

// The image table of a launch, passed by value as a kernel parameter (__grid_constant__: read in place from the
// parameter bank, never copied per thread), so that no host-to-device copy (which from pageable memory would wait
// for the stream) precedes the kernels. A batch of more images is launched in chunks of kSlotsPerLaunch.
constexpr int64_t kSlotsPerLaunch = 48;  // 48 x 128 B: 6 KB of parameters (up to 32 KB since CUDA 12.1, sm_70+)

// A slice [first, first + count) of one of the batch's flat index spaces.
struct Span {
  int64_t first, count;
};

// One launch's slots, of any of the launchers' slot types.
template <typename Slot>
struct LaunchTable {
  int64_t count = 0;
  Slot slot[kSlotsPerLaunch];
};

// The table of the ops on regions (SMFA, NMS and painting), whose slots are ImageSlots.
struct SlotTable : LaunchTable<ImageSlot> {

  // The slices of the batch's regions, patches and pixels that this chunk's images hold.
  Span regions() const { return span(slot[0].region_offset, last().region_offset + last().count); }
  Span patches() const { return span(slot[0].patch_offset, last().patch_offset + last().grid_h * last().grid_w); }
  Span pixels() const { return span(slot[0].pixel_offset, last().pixel_offset + last().height * last().width); }

 private:
  const ImageSlot& last() const { return slot[count - 1]; }
  static Span span(int64_t begin, int64_t end) { return Span{begin, end - begin}; }
};

// Calls launch(table) for consecutive chunks of at most kSlotsPerLaunch images; the slots keep the whole batch's
// offsets, so each chunk's kernels index the batch's arrays directly. Table: SlotTable, or LaunchTable<Slot>.
template <typename Table, typename Slot, typename Launch>
void for_each_chunk(const Slot* slots, int64_t num_images, Launch launch) {
  for (int64_t first = 0; first < num_images; first += kSlotsPerLaunch) {
    Table table;
    table.count = num_images - first < kSlotsPerLaunch ? num_images - first : kSlotsPerLaunch;
    for (int64_t b = 0; b < table.count; ++b) table.slot[b] = slots[first + b];
    launch(table);
  }
}

// Selects the caller's device for the duration of a launcher call.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cuda_check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (device != previous_) cuda_check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

inline unsigned blocks_for(int64_t work, int threads) {
  return static_cast<unsigned>((work + threads - 1) / threads);
}

// A thread block as a Team of the shared bodies: lanes are threads; sum reduces in a fixed order (deterministic).
struct BlockTeam {
  int64_t lane, lanes;
  double* scratch;  // blockDim.x doubles of shared memory
  __device__ void sync() const { __syncthreads(); }
  __device__ double sum(double x) const {
    scratch[lane] = x;
    __syncthreads();
    for (int64_t half = 1; half < lanes; half *= 2) {
      const int64_t partner = lane + half;
      const bool add = lane % (2 * half) == 0 && partner < lanes;
      const double value = add ? scratch[partner] : 0.0;
      __syncthreads();
      if (add) scratch[lane] += value;
      __syncthreads();
    }
    const double total = scratch[0];
    __syncthreads();
    return total;
  }
};

}  // namespace moduseg
