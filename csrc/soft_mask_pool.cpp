// CPU soft-mask feature aggregation (SMFA) over regions made of atoms. SMFA is linear in the mask, so each atom is
// pooled once and a region's sums are the sums of its atoms':
//   1. per patch, the pixels of each atom inside it (one pass over the atom map, parallel over patch rows);
//   2. per atom, S_a = sum_p (c_ap / stride^2) F_p and W_a = sum_p c_ap / stride^2 (parallel over atoms);
//   3. per region, (sum_a S_a) / (sum_a W_a + eps), L2-normalised (parallel over regions).
// Accumulation is in double, in an order that does not depend on the thread count. With feature groups (layers of a
// multi-layer backbone), each group's part of the vector is L2-normalised before the whole vector is.
#include <algorithm>
#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

namespace moduseg {

namespace {

struct Overlap {
  int32_t atom;
  int32_t count;  // pixels of the atom inside the patch
  int64_t patch;
};

// The atoms inside one patch and their pixel counts. Atoms are few per patch and mostly run along rows, so a short
// list with a "same as the last pixel" shortcut beats any map.
void count_patch(const int32_t* atoms, int64_t width, int64_t y0, int64_t y1, int64_t x0, int64_t x1,
                 int64_t patch, std::vector<Overlap>& out) {
  const size_t start = out.size();
  size_t last = start;
  for (int64_t y = y0; y < y1; ++y) {
    const int32_t* row = atoms + y * width;
    for (int64_t x = x0; x < x1; ++x) {
      const int32_t atom = row[x];
      if (last < out.size() && out[last].atom == atom) {
        ++out[last].count;
        continue;
      }
      size_t k = start;
      while (k < out.size() && out[k].atom != atom) ++k;
      if (k == out.size()) out.push_back({atom, 0, patch});
      ++out[k].count;
      last = k;
    }
  }
}

}  // namespace

void soft_mask_pool_cpu(const float* features, int64_t grid_h, int64_t grid_w, int64_t dim, const int32_t* atoms,
                        int64_t height, int64_t width, int64_t num_atoms, const uint8_t* members, int64_t count,
                        int64_t stride, bool hard, double eps, bool normalize, const int64_t* groups,
                        int64_t num_groups, float* out, int num_threads) {
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
#endif
  // 1. (atom, patch, pixels) overlaps, row of patches by row of patches.
  std::vector<std::vector<Overlap>> rows(static_cast<size_t>(grid_h));
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
#endif
  for (int64_t by = 0; by < grid_h; ++by) {
    std::vector<Overlap>& row = rows[by];
    for (int64_t bx = 0; bx < grid_w; ++bx) {
      const int64_t patch = by * grid_w + bx;
      if (hard) {  // the centre pixel only (a centre in the zero padding covers nothing)
        const int64_t y = by * stride + stride / 2, x = bx * stride + stride / 2;
        if (y < height && x < width) row.push_back({atoms[y * width + x], 1, patch});
        continue;
      }
      count_patch(atoms, width, by * stride, std::min(height, (by + 1) * stride), bx * stride,
                  std::min(width, (bx + 1) * stride), patch, row);
    }
  }

  // 2. Overlaps grouped by atom (a counting sort keeps patch order within an atom), then each atom's sums.
  std::vector<int64_t> offsets(static_cast<size_t>(num_atoms + 1), 0);
  for (const auto& row : rows)
    for (const Overlap& o : row) ++offsets[o.atom + 1];
  for (int64_t a = 0; a < num_atoms; ++a) offsets[a + 1] += offsets[a];
  std::vector<Overlap> by_atom(static_cast<size_t>(offsets[num_atoms]));
  {
    std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
    for (const auto& row : rows)
      for (const Overlap& o : row) by_atom[next[o.atom]++] = o;
  }
  const double block_area = hard ? 1.0 : static_cast<double>(stride * stride);
  std::vector<double> sums(static_cast<size_t>(num_atoms * dim), 0.0);
  std::vector<double> weights(static_cast<size_t>(num_atoms), 0.0);
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 64) num_threads(threads)
#endif
  for (int64_t a = 0; a < num_atoms; ++a) {
    double* s = sums.data() + a * dim;
    for (int64_t k = offsets[a]; k < offsets[a + 1]; ++k) {
      const Overlap& o = by_atom[k];
      const double w = static_cast<double>(o.count) / block_area;
      weights[a] += w;
      const float* f = features + o.patch * dim;
      for (int64_t d = 0; d < dim; ++d) s[d] += w * static_cast<double>(f[d]);
    }
  }

  // 3. Regions: the sums of their atoms, divided, normalised.
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads)
#endif
  for (int64_t n = 0; n < count; ++n) {
    std::vector<double> acc(static_cast<size_t>(dim), 0.0);
    double weight_sum = 0.0;
    const uint8_t* row = members + n * num_atoms;
    for (int64_t a = 0; a < num_atoms; ++a) {
      if (!row[a] || weights[a] == 0.0) continue;
      weight_sum += weights[a];
      const double* s = sums.data() + a * dim;
      for (int64_t d = 0; d < dim; ++d) acc[d] += s[d];
    }
    const double denom = weight_sum + eps;
    for (int64_t d = 0; d < dim; ++d) acc[d] /= denom;
    if (normalize) {
      for (int64_t g = 0, start = 0; g < num_groups; start += groups[g], ++g) {
        double group_sq = 0.0;
        for (int64_t d = start; d < start + groups[g]; ++d) group_sq += acc[d] * acc[d];
        const double group_norm = std::max(std::sqrt(group_sq), 1e-12);
        for (int64_t d = start; d < start + groups[g]; ++d) acc[d] /= group_norm;
      }
    }
    double sq = 0.0;
    for (int64_t d = 0; d < dim; ++d) sq += acc[d] * acc[d];
    const double norm = normalize ? std::max(std::sqrt(sq), 1e-12) : 1.0;
    float* o = out + n * dim;
    for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<float>(acc[d] / norm);
  }
}

}  // namespace moduseg
