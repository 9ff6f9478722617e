// CUDA launcher of SLIC: one thread block per image runs slic_image (the block is the Team), one kernel per batch
// (per kSlotsPerLaunch images). Compiled with -fmad=false (CMakeLists.txt): the distances and means round as on the
// CPU, so the labels are the CPU's exactly.
#include "cuda_utils.cuh"
#include "slic/slic.h"

namespace moduseg {

namespace {

constexpr int kThreads = 512;

using SlicTable = LaunchTable<SlicSlot>;

__global__ void slic_kernel(const __grid_constant__ SlicTable table, int32_t iterations, SlicScratch s) {
  __shared__ double reduce[kThreads];
  BlockTeam team{threadIdx.x, blockDim.x, reduce};
  slic_image(team, table.slot[blockIdx.x], iterations, s);
}

}  // namespace

void slic_cuda(SlicSlot* slots, int64_t num_images, int32_t iterations, int device, void* stream_handle) {
  int64_t pixels = 0, centres = 0;
  plan_slic(slots, num_images, &pixels, &centres);
  if (num_images == 0) return;
  DeviceGuard guard(device);
  auto stream = static_cast<cudaStream_t>(stream_handle);
  StreamBuffer centre(centres * 5 * sizeof(double), stream), assign(pixels * sizeof(int32_t), stream);
  StreamBuffer piece(pixels * sizeof(int32_t), stream), size(pixels * sizeof(int32_t), stream);
  const SlicScratch s{centre.as<double>(), assign.as<int32_t>(), piece.as<int32_t>(), size.as<int32_t>()};
  for_each_chunk<SlicTable>(slots, num_images, [&](const SlicTable& table) {
    slic_kernel<<<static_cast<unsigned>(table.count), kThreads, 0, stream>>>(table, iterations, s);
    launched("slic: slic_kernel");
  });
}

}  // namespace moduseg
