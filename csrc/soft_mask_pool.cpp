// CPU soft-mask feature aggregation (SMFA), fused: per mask, count covered pixels per patch block, then the weighted
// mean of the patch features and the L2 normalisation, without ever materialising a resized mask.
#include <algorithm>
#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

namespace moduseg {

namespace {

// Counts the covered pixels of each patch of one mask. Per band of `stride` rows, per-column counters are summed
// over the rows first (a contiguous, vectorisable loop), then each patch adds up its `stride` columns.
template <typename Counter>
void count_blocks(const uint8_t* mask, int64_t height, int64_t width, int64_t stride, int64_t grid_w,
                  Counter* columns, int32_t* counts) {
  for (int64_t y0 = 0, by = 0; y0 < height; y0 += stride, ++by) {
    const int64_t y1 = std::min(height, y0 + stride);
    std::fill(columns, columns + width, Counter{0});
    for (int64_t y = y0; y < y1; ++y) {
      const uint8_t* row = mask + y * width;
      for (int64_t x = 0; x < width; ++x) columns[x] += static_cast<Counter>(row[x] != 0);
    }
    int32_t* out = counts + by * grid_w;
    for (int64_t bx = 0; bx < grid_w; ++bx) {
      const int64_t x1 = std::min(width, (bx + 1) * stride);
      int32_t covered = 0;
      for (int64_t x = bx * stride; x < x1; ++x) covered += static_cast<int32_t>(columns[x]);
      out[bx] = covered;
    }
  }
}

}  // namespace

void soft_mask_pool_cpu(const float* features, int64_t grid_h, int64_t grid_w, int64_t dim, const uint8_t* masks,
                        int64_t count, int64_t height, int64_t width, int64_t stride, double eps, bool normalize,
                        float* out, int num_threads) {
  const int64_t patches = grid_h * grid_w;
  const int64_t pixels = height * width;
  // The reference's weight is the mean of stride*stride zero/one values: covered / (stride*stride), in float64.
  const double block_area = static_cast<double>(stride * stride);
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel num_threads(threads)
#endif
  {
    std::vector<int32_t> counts(static_cast<size_t>(patches));
    std::vector<double> acc(static_cast<size_t>(dim));
    // A band has at most `stride` rows: 16-bit column counters suffice (and vectorise twice as wide) below 65536.
    std::vector<uint16_t> columns16(stride <= 65535 ? static_cast<size_t>(width) : 0);
    std::vector<int32_t> columns32(stride <= 65535 ? 0 : static_cast<size_t>(width));
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t n = 0; n < count; ++n) {
      const uint8_t* mask = masks + n * pixels;
      if (stride <= 65535)
        count_blocks(mask, height, width, stride, grid_w, columns16.data(), counts.data());
      else
        count_blocks(mask, height, width, stride, grid_w, columns32.data(), counts.data());

      std::fill(acc.begin(), acc.end(), 0.0);
      double weight_sum = 0.0;
      for (int64_t p = 0; p < patches; ++p) {
        if (counts[p] == 0) continue;
        const double w = static_cast<double>(counts[p]) / block_area;
        weight_sum += w;
        const float* f = features + p * dim;
        double* a = acc.data();
        for (int64_t d = 0; d < dim; ++d) a[d] += w * static_cast<double>(f[d]);
      }
      const double denom = weight_sum + eps;
      double sq = 0.0;
      for (int64_t d = 0; d < dim; ++d) {
        acc[d] /= denom;
        sq += acc[d] * acc[d];
      }
      // Divide (as the reference does) rather than multiply by a reciprocal: identical double rounding.
      const double norm = normalize ? std::max(std::sqrt(sq), 1e-12) : 1.0;
      float* o = out + n * dim;
      for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<float>(acc[d] / norm);
    }
  }
}

}  // namespace moduseg
