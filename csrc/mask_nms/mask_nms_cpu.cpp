// CPU launcher of mask NMS + rasterisation: the bodies of mask_nms.h in OpenMP loops. Pixels are counted by one
// thread per image (the body's add is a plain add on the host); everything else is parallel as on the device.
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "mask_nms/mask_nms.h"

namespace moduseg {

void mask_nms_raster_cpu(ImageSlot* slots, int64_t num_images, const NmsArgs& args, int num_threads) {
  const BatchTotals totals = plan_batch(slots, num_images);
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
#endif
  std::vector<int32_t> atom_area(static_cast<size_t>(totals.atoms), 0), atom_owner(atom_area.size());
  std::vector<uint64_t> bits(static_cast<size_t>(totals.words));
  std::vector<int64_t> area(static_cast<size_t>(totals.regions));
  std::vector<int32_t> order(area.size());
  const NmsScratch s{atom_area.data(), atom_owner.data(), bits.data(), area.data(), order.data()};
  const auto by_region = [](const ImageSlot& slot) { return slot.region_offset; };

#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t b = 0; b < num_images; ++b)
      for (int64_t p = 0; p < slots[b].height * slots[b].width; ++p) count_pixel(slots[b], p, s);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 16)
#endif
    for (int64_t row = 0; row < totals.regions; ++row) {
      const ImageSlot& img = slots[find_image(slots, num_images, row, by_region)];
      pack_region(img, row - img.region_offset, s);
      rank_region(img, row - img.region_offset, args, s);
    }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t b = 0; b < num_images; ++b) {
      greedy_image(slots[b], args, s);
      for (int64_t p = 0; p < slots[b].height * slots[b].width; ++p) paint_pixel(slots[b], p, args, s);
    }
  }
}

}  // namespace moduseg
