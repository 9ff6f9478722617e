// CUDA launcher of mask NMS + rasterisation: the bodies of mask_nms.h in four kernels per batch, whatever its images
// and regions: pixels (atom areas), regions (bits, areas, ranks), images (the greedy pass: one thread each, as the
// pass is sequential by definition) and pixels again (paint).
#include "cuda_utils.cuh"
#include "mask_nms/mask_nms.h"

namespace moduseg {

namespace {

__device__ const ImageSlot& image_of_pixel(const ImageSlot* slots, int64_t num_images, int64_t pixel) {
  return slots[find_image(slots, num_images, pixel, [](const ImageSlot& s) { return s.pixel_offset; })];
}

__global__ void count_kernel(const ImageSlot* slots, int64_t num_images, int64_t pixels, NmsScratch s) {
  const int64_t pixel = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (pixel >= pixels) return;
  const ImageSlot& img = image_of_pixel(slots, num_images, pixel);
  count_pixel(img, pixel - img.pixel_offset, s);
}

__global__ void region_kernel(const ImageSlot* slots, int64_t num_images, int64_t regions, NmsArgs args,
                              NmsScratch s) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= regions) return;
  const ImageSlot& img = slots[find_image(slots, num_images, row, [](const ImageSlot& t) {
    return t.region_offset;
  })];
  pack_region(img, row - img.region_offset, s);
  rank_region(img, row - img.region_offset, args, s);
}

__global__ void greedy_kernel(const ImageSlot* slots, int64_t num_images, NmsArgs args, NmsScratch s) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b < num_images) greedy_image(slots[b], args, s);
}

__global__ void paint_kernel(const ImageSlot* slots, int64_t num_images, int64_t pixels, NmsArgs args,
                             NmsScratch s) {
  const int64_t pixel = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (pixel >= pixels) return;
  const ImageSlot& img = image_of_pixel(slots, num_images, pixel);
  paint_pixel(img, pixel - img.pixel_offset, args, s);
}

}  // namespace

void mask_nms_raster_cuda(ImageSlot* slots, int64_t num_images, const NmsArgs& args, int device,
                          void* stream_handle) {
  const BatchTotals totals = plan_batch(slots, num_images);
  if (num_images == 0) return;
  DeviceGuard guard(device);
  auto stream = static_cast<cudaStream_t>(stream_handle);
  StreamBuffer table = upload_slots(slots, num_images, stream);
  StreamBuffer atom_area(totals.atoms * sizeof(int32_t), stream), atom_owner(totals.atoms * sizeof(int32_t), stream);
  StreamBuffer bits(totals.words * sizeof(uint64_t), stream), area(totals.regions * sizeof(int64_t), stream);
  StreamBuffer order(totals.regions * sizeof(int32_t), stream);
  const NmsScratch s{atom_area.as<int32_t>(), atom_owner.as<int32_t>(), bits.as<uint64_t>(), area.as<int64_t>(),
                     order.as<int32_t>()};
  const ImageSlot* d_slots = table.as<ImageSlot>();
  if (totals.atoms)
    cuda_check(cudaMemsetAsync(s.atom_area, 0, totals.atoms * sizeof(int32_t), stream), "cudaMemsetAsync");
  count_kernel<<<blocks_for(totals.pixels, 256), 256, 0, stream>>>(d_slots, num_images, totals.pixels, s);
  launched("mask_nms_raster: count_kernel");
  if (totals.regions) {
    region_kernel<<<blocks_for(totals.regions, 128), 128, 0, stream>>>(d_slots, num_images, totals.regions, args, s);
    launched("mask_nms_raster: region_kernel");
  }
  greedy_kernel<<<blocks_for(num_images, 32), 32, 0, stream>>>(d_slots, num_images, args, s);
  launched("mask_nms_raster: greedy_kernel");
  paint_kernel<<<blocks_for(totals.pixels, 256), 256, 0, stream>>>(d_slots, num_images, totals.pixels, args, s);
  launched("mask_nms_raster: paint_kernel");
}

}  // namespace moduseg
