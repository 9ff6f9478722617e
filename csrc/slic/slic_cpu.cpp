// CPU launcher of SLIC: slic_image with one lane per image, the images in an OpenMP loop.
#include <vector>

#include "cpu_parallel.h"
#include "slic/slic.h"

namespace moduseg {

void slic_cpu(SlicSlot* slots, int64_t num_images, int32_t iterations, int num_threads) {
  int64_t pixels = 0, centres = 0;
  plan_slic(slots, num_images, &pixels, &centres);
  std::vector<double> centre(static_cast<size_t>(centres) * 5);
  std::vector<int32_t> assign(static_cast<size_t>(pixels)), piece(assign.size()), size(assign.size());
  const SlicScratch s{centre.data(), assign.data(), piece.data(), size.data()};
  parallel_for_each(num_images, num_images > 1, num_threads, [&](int64_t b) {
    SerialTeam team;
    slic_image(team, slots[b], iterations, s);
  });
}

}  // namespace moduseg
