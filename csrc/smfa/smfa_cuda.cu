// CUDA launcher of SMFA: the bodies of smfa.h in two kernels per batch (per kSlotsPerLaunch images), whatever its
// images and regions: one thread per patch for the overlap lists (fixed capacity stride^2 a patch), one thread block
// per region with the feature dimensions strided over its threads.
#include "cuda_utils.cuh"
#include "smfa/smfa.h"

namespace moduseg {

namespace {

constexpr int kPerLane = 8;  // feature dimensions a thread accumulates (a block of up to 1024 threads: 8192 dims)

__device__ const ImageSlot& image_of_patch(const SlotTable& table, int64_t patch) {
  return table.slot[find_image(table.slot, table.count, patch, [](const ImageSlot& s) { return s.patch_offset; })];
}

__global__ void overlaps_kernel(const __grid_constant__ SlotTable table, SmfaArgs args, int64_t first,
                                int64_t patches, int32_t* atom, int32_t* pixels, int64_t* start, int32_t* found) {
  const int64_t patch = first + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (patch >= first + patches) return;
  const ImageSlot& img = image_of_patch(table, patch);
  const int64_t slot = patch * args.capacity;
  start[patch] = slot;
  found[patch] = patch_overlaps(img, args, patch - img.patch_offset, atom + slot, pixels + slot);
}

__global__ void pool_kernel(const __grid_constant__ SlotTable table, SmfaArgs args, int64_t first,
                            const int32_t* atom, const int32_t* pixels, const int64_t* start, const int32_t* found,
                            float* out) {
  __shared__ double tile[kPatchTile];
  extern __shared__ double reduce[];
  const int64_t row = first + blockIdx.x;
  const ImageSlot& img =
      table.slot[find_image(table.slot, table.count, row, [](const ImageSlot& s) { return s.region_offset; })];
  BlockTeam team{threadIdx.x, blockDim.x, reduce};
  double acc[kPerLane];
  pool_region(team, img, row - img.region_offset, args, atom, pixels, start, found, acc, tile,
              out + row * args.dim);
}

}  // namespace

void soft_mask_pool_cuda(ImageSlot* slots, int64_t num_images, const SmfaArgs& args, float* out, int device,
                         void* stream_handle) {
  const BatchTotals totals = plan_batch(slots, num_images);
  if (totals.regions == 0) return;
  if (args.dim > 1024 * kPerLane) throw std::invalid_argument("soft_mask_pool on CUDA: at most 8192 dimensions");
  DeviceGuard guard(device);
  auto stream = static_cast<cudaStream_t>(stream_handle);
  const size_t entries = static_cast<size_t>(totals.patches) * args.capacity;
  StreamBuffer atom(entries * sizeof(int32_t), stream), pixels(entries * sizeof(int32_t), stream);
  StreamBuffer start(totals.patches * sizeof(int64_t), stream), found(totals.patches * sizeof(int32_t), stream);
  // enough threads that each holds at most kPerLane dimensions, in whole warps
  int threads = static_cast<int>((args.dim + kPerLane - 1) / kPerLane);
  threads = threads < 32 ? 32 : (threads + 31) / 32 * 32;
  for_each_chunk<SlotTable>(slots, num_images, [&](const SlotTable& table) {
    const Span patches = table.patches(), regions = table.regions();
    if (regions.count == 0) return;  // nothing to pool in this chunk
    overlaps_kernel<<<blocks_for(patches.count, 128), 128, 0, stream>>>(
        table, args, patches.first, patches.count, atom.as<int32_t>(), pixels.as<int32_t>(), start.as<int64_t>(),
        found.as<int32_t>());
    launched("soft_mask_pool: overlaps_kernel");
    pool_kernel<<<static_cast<unsigned>(regions.count), threads, threads * sizeof(double), stream>>>(
        table, args, regions.first, atom.as<int32_t>(), pixels.as<int32_t>(), start.as<int64_t>(),
        found.as<int32_t>(), out);
    launched("soft_mask_pool: pool_kernel");
  });
}

}  // namespace moduseg
