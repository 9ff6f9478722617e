// CUDA launcher of mask NMS + rasterisation: the bodies of mask_nms.h in four kernels per batch (per
// kSlotsPerLaunch images), whatever its images and regions: pixels (atom areas), regions (bits, areas, ranks),
// images (the greedy pass: one thread each, as the pass is sequential by definition) and pixels again (paint).
#include "cuda_utils.cuh"
#include "mask_nms/mask_nms.h"

namespace moduseg {

namespace {

__device__ const ImageSlot& image_of_pixel(const SlotTable& table, int64_t pixel) {
  return table.slot[find_image(table.slot, table.count, pixel, [](const ImageSlot& s) { return s.pixel_offset; })];
}

__device__ int64_t thread_index() { return blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; }

__global__ void count_kernel(const __grid_constant__ SlotTable table, int64_t first, int64_t pixels,
                             NmsScratch s) {
  const int64_t pixel = first + thread_index();
  if (pixel >= first + pixels) return;
  const ImageSlot& img = image_of_pixel(table, pixel);
  count_pixel(img, pixel - img.pixel_offset, s);
}

__global__ void region_kernel(const __grid_constant__ SlotTable table, int64_t first, int64_t regions,
                              NmsArgs args, NmsScratch s) {
  const int64_t row = first + thread_index();
  if (row >= first + regions) return;
  const ImageSlot& img =
      table.slot[find_image(table.slot, table.count, row, [](const ImageSlot& t) { return t.region_offset; })];
  pack_region(img, row - img.region_offset, s);
  rank_region(img, row - img.region_offset, args, s);
}

__global__ void greedy_kernel(const __grid_constant__ SlotTable table, NmsArgs args, NmsScratch s) {
  const int64_t b = thread_index();
  if (b < table.count) greedy_image(table.slot[b], args, s);
}

__global__ void paint_kernel(const __grid_constant__ SlotTable table, int64_t first, int64_t pixels, NmsArgs args,
                             NmsScratch s) {
  const int64_t pixel = first + thread_index();
  if (pixel >= first + pixels) return;
  const ImageSlot& img = image_of_pixel(table, pixel);
  paint_pixel(img, pixel - img.pixel_offset, args, s);
}

}  // namespace

void mask_nms_raster_cuda(ImageSlot* slots, int64_t num_images, const NmsArgs& args, int device,
                          void* stream_handle) {
  const BatchTotals totals = plan_batch(slots, num_images);
  if (num_images == 0) return;
  DeviceGuard guard(device);
  auto stream = static_cast<cudaStream_t>(stream_handle);
  StreamBuffer atom_area(totals.atoms * sizeof(int32_t), stream), atom_owner(totals.atoms * sizeof(int32_t), stream);
  StreamBuffer bits(totals.words * sizeof(uint64_t), stream), area(totals.regions * sizeof(int64_t), stream);
  StreamBuffer order(totals.regions * sizeof(int32_t), stream);
  const NmsScratch s{atom_area.as<int32_t>(), atom_owner.as<int32_t>(), bits.as<uint64_t>(), area.as<int64_t>(),
                     order.as<int32_t>()};
  if (totals.atoms)
    cuda_check(cudaMemsetAsync(s.atom_area, 0, totals.atoms * sizeof(int32_t), stream), "cudaMemsetAsync");
  for_each_chunk<SlotTable>(slots, num_images, [&](const SlotTable& table) {
    const Span pixels = table.pixels(), regions = table.regions();
    count_kernel<<<blocks_for(pixels.count, 256), 256, 0, stream>>>(table, pixels.first, pixels.count, s);
    launched("mask_nms_raster: count_kernel");
    if (regions.count) {
      region_kernel<<<blocks_for(regions.count, 128), 128, 0, stream>>>(table, regions.first, regions.count, args,
                                                                        s);
      launched("mask_nms_raster: region_kernel");
    }
    greedy_kernel<<<blocks_for(table.count, 32), 32, 0, stream>>>(table, args, s);
    launched("mask_nms_raster: greedy_kernel");
    paint_kernel<<<blocks_for(pixels.count, 256), 256, 0, stream>>>(table, pixels.first, pixels.count, args, s);
    launched("mask_nms_raster: paint_kernel");
  });
}

}  // namespace moduseg
