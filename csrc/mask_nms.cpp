// CPU class-specific mask NMS + confidence-priority rasteriser over regions made of atoms. Areas and intersections
// are sums of atom areas (exact integers), so the greedy pass never touches pixels; painting assigns each atom its
// first kept region, and one pass over the atom map writes the label and owner maps.
#include <algorithm>
#include <numeric>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

namespace moduseg {

void mask_nms_raster_cpu(const int32_t* atoms, int64_t height, int64_t width, int64_t num_atoms,
                         const uint8_t* members, int64_t count, const int32_t* classes, const double* scores,
                         double iou_threshold, int32_t background, uint8_t* keep, int32_t* label_map, int32_t* owner,
                         int num_threads) {
  const int64_t pixels = height * width;
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
#endif
  std::fill(keep, keep + count, uint8_t{0});

  std::vector<int64_t> atom_area(static_cast<size_t>(num_atoms), 0);
  for (int64_t p = 0; p < pixels; ++p) ++atom_area[atoms[p]];

  // Member atoms of each region (with a nonzero area: only they count) and the region's area.
  std::vector<std::vector<int32_t>> parts(static_cast<size_t>(count));
  std::vector<int64_t> area(static_cast<size_t>(count), 0);
  for (int64_t n = 0; n < count; ++n) {
    const uint8_t* row = members + n * num_atoms;
    for (int64_t a = 0; a < num_atoms; ++a) {
      if (row[a] && atom_area[a]) {
        parts[n].push_back(static_cast<int32_t>(a));
        area[n] += atom_area[a];
      }
    }
  }

  // suppress[i * count + j]: same class and IoU(i, j) > threshold (an empty union has IoU 0).
  std::vector<uint8_t> suppress(static_cast<size_t>(count * count), 0);
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    std::vector<uint8_t> in_i(static_cast<size_t>(num_atoms), 0);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t i = 0; i < count; ++i) {
      for (int32_t a : parts[i]) in_i[a] = 1;
      for (int64_t j = i + 1; j < count; ++j) {
        if (classes[i] != classes[j]) continue;
        int64_t inter = 0;
        for (int32_t a : parts[j])
          if (in_i[a]) inter += atom_area[a];
        const int64_t uni = area[i] + area[j] - inter;
        // Same float64 division as the reference: inter / union, compared with the threshold.
        const double iou = uni ? static_cast<double>(inter) / static_cast<double>(uni) : 0.0;
        const uint8_t s = iou > iou_threshold;
        suppress[i * count + j] = s;
        suppress[j * count + i] = s;
      }
      for (int32_t a : parts[i]) in_i[a] = 0;
    }
  }

  // Greedy pass in processing order: score descending, equal scores in index order.
  std::vector<int64_t> order(static_cast<size_t>(count));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [scores](int64_t a, int64_t b) { return scores[a] > scores[b]; });
  std::vector<int32_t> atom_owner(static_cast<size_t>(num_atoms), -1);
  std::vector<int64_t> kept;
  for (int64_t i : order) {
    const uint8_t* row = suppress.data() + i * count;
    bool suppressed = false;
    for (int64_t j : kept) {
      if (row[j]) {
        suppressed = true;
        break;
      }
    }
    if (suppressed) continue;
    keep[i] = 1;
    kept.push_back(i);
    for (int32_t a : parts[i])  // a pixel keeps the first kept region that covers it
      if (atom_owner[a] < 0) atom_owner[a] = static_cast<int32_t>(i);
  }

#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
  for (int64_t y = 0; y < height; ++y) {
    for (int64_t p = y * width; p < (y + 1) * width; ++p) {
      const int32_t n = atom_owner[atoms[p]];
      owner[p] = n;
      label_map[p] = n >= 0 ? classes[n] : background;
    }
  }
}

}  // namespace moduseg
