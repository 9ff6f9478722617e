// CPU launcher of SMFA: the bodies of smfa.h in OpenMP loops (patches, then regions), one lane per region. The
// patches' overlap lists are packed end to end (a patch holds a few atoms, far fewer than its stride^2 capacity).
#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_parallel.h"
#include "smfa/smfa.h"

namespace moduseg {

namespace {

struct Overlaps {  // every patch's (atom, pixels) list, packed
  std::vector<int32_t> atom, pixels, found;
  std::vector<int64_t> start;
};

Overlaps patch_overlaps_cpu(const ImageSlot* slots, int64_t num_images, const SmfaArgs& args, int64_t patches,
                            int threads) {
  // Chunks of consecutive patches fill lists of their own in parallel; the lists are then joined in patch order.
  const int64_t chunk = 256, chunks = (patches + chunk - 1) / chunk;
  std::vector<std::vector<int32_t>> atoms(chunks), pixels(chunks);
  Overlaps o;
  o.found.resize(patches);
  o.start.resize(patches);
  parallel_for_each(chunks, true, threads, [&](int64_t c) {
    std::vector<int32_t> atom(args.capacity), count(args.capacity);
    for (int64_t patch = c * chunk; patch < std::min(patches, (c + 1) * chunk); ++patch) {
      const ImageSlot& img = slots[find_image(slots, num_images, patch, [](const ImageSlot& s) {
        return s.patch_offset;
      })];
      const int32_t found = patch_overlaps(img, args, patch - img.patch_offset, atom.data(), count.data());
      o.found[patch] = found;
      o.start[patch] = static_cast<int64_t>(atoms[c].size());  // within the chunk, rebased below
      atoms[c].insert(atoms[c].end(), atom.begin(), atom.begin() + found);
      pixels[c].insert(pixels[c].end(), count.begin(), count.begin() + found);
    }
  });
  int64_t base = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t patch = c * chunk; patch < std::min(patches, (c + 1) * chunk); ++patch) o.start[patch] += base;
    o.atom.insert(o.atom.end(), atoms[c].begin(), atoms[c].end());
    o.pixels.insert(o.pixels.end(), pixels[c].begin(), pixels[c].end());
    base += static_cast<int64_t>(atoms[c].size());
  }
  return o;
}

}  // namespace

void soft_mask_pool_cpu(ImageSlot* slots, int64_t num_images, const SmfaArgs& args, float* out, int num_threads) {
  const BatchTotals totals = plan_batch(slots, num_images);
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  const int threads = 1;
  (void)num_threads;
#endif
  const Overlaps o = patch_overlaps_cpu(slots, num_images, args, totals.patches, threads);
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    std::vector<double> acc(static_cast<size_t>(args.dim)), tile(kPatchTile);
    SerialTeam team;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 4)
#endif
    for (int64_t row = 0; row < totals.regions; ++row) {
      const ImageSlot& img = slots[find_image(slots, num_images, row, [](const ImageSlot& s) {
        return s.region_offset;
      })];
      pool_region(team, img, row - img.region_offset, args, o.atom.data(), o.pixels.data(), o.start.data(),
                  o.found.data(), acc.data(), tile.data(), out + row * args.dim);
    }
  }
}

}  // namespace moduseg
