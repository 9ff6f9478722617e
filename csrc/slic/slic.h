// SLIC superpixels (local k-means on Lab colour + position), batched over images, one body for both launchers. Per
// image, run by a Team of lanes (one lane on the CPU, a thread block on the GPU), phases separated by team.sync():
//   1. seeds: one centre per cell of a grid_h x grid_w grid (cell i holds the rows y with y * grid_h / H == i,
//      columns likewise), at the cell's middle pixel, with that pixel's colour;
//   2. `iterations` rounds of: every pixel takes, among the centres of its cell and the 8 cells around it, the one
//      with the smallest D = |lab_p - lab_c|^2 + (compactness / S)^2 |pos_p - pos_c|^2 (S = sqrt(H W / centres);
//      equal D: the lower centre index); then every centre becomes the mean of its pixels, gathered from the 3 x 3
//      cells around its own in raster order (a centre without pixels stays); then a last assignment;
//   3. connectivity: 4-connected pieces of equal assignment, each named by its first pixel in raster order (found by
//      min-label propagation with pointer jumping, to the fixed point, which is unique whatever the schedule);
//   4. a piece smaller than min_size pixels joins the piece of the pixel left of its first pixel (above it in the
//      first column: SLIC's "adjacent label"), repeatedly while that one is small too (the first pixel's piece is
//      always kept, so the chain ends);
//   5. the kept pieces are numbered 0.. in order of their first pixels.
// Sums are in double in a fixed order and sizes are integer counts, so the result does not depend on the schedule
// (the CUDA launcher is compiled without FMA contraction so that it equals the CPU's bit for bit).
// The NumPy twin that defines the result is engine.reference.slic_superpixels.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace moduseg {

struct SlicSlot {
  const float* lab = nullptr;  // height x width x 3 (L, a, b)
  int32_t* labels = nullptr;   // height x width output
  int64_t height = 0, width = 0, grid_h = 1, grid_w = 1, min_size = 1;
  double weight = 0.0;  // (compactness / S)^2
  int64_t pixel_offset = 0, centre_offset = 0;  // in the batch's per-pixel and per-centre scratch
};

// Per-pixel scratch (batch pixels) and per-centre scratch (5 doubles a centre: L, a, b, y, x).
struct SlicScratch {
  double* centres = nullptr;
  int32_t* assign = nullptr;  // the centre of each pixel
  int32_t* piece = nullptr;   // the first pixel of each pixel's piece; then, at first pixels, the final numbers
  int32_t* size = nullptr;    // at first pixels: the piece's size; then the per-row counts of kept pieces
};

HOST_DEVICE_INLINE int64_t cell_start(int64_t cell, int64_t cells, int64_t extent) {
  return (cell * extent + cells - 1) / cells;  // the first row (column) y with y * cells / extent == cell
}

// The centre with the smallest distance among those of the 3 x 3 cells around pixel (y, x).
HOST_DEVICE_INLINE int32_t nearest_centre(const SlicSlot& img, const double* centre, int64_t y, int64_t x) {
  const float* lab = img.lab + (y * img.width + x) * 3;
  const int64_t ci = y * img.grid_h / img.height, cj = x * img.grid_w / img.width;
  int32_t best = -1;
  double best_d = 0.0;
  for (int64_t i = ci - 1; i <= ci + 1; ++i) {
    for (int64_t j = cj - 1; j <= cj + 1; ++j) {
      if (i < 0 || j < 0 || i >= img.grid_h || j >= img.grid_w) continue;
      const int64_t k = i * img.grid_w + j;
      const double* c = centre + k * 5;
      const double dl = lab[0] - c[0], da = lab[1] - c[1], db = lab[2] - c[2];
      const double dy = static_cast<double>(y) - c[3], dx = static_cast<double>(x) - c[4];
      const double d = (dl * dl + da * da + db * db) + img.weight * (dy * dy + dx * dx);
      if (best < 0 || d < best_d) {  // candidates come in increasing index: equal D keeps the lower
        best = static_cast<int32_t>(k);
        best_d = d;
      }
    }
  }
  return best;
}

// Centre k becomes the mean (colour, position) of its pixels, which all lie in the 3 x 3 cells around its cell.
HOST_DEVICE_INLINE void update_centre(const SlicSlot& img, const int32_t* assign, double* centre, int64_t k) {
  const int64_t i = k / img.grid_w, j = k % img.grid_w;
  const int64_t y0 = cell_start(i > 0 ? i - 1 : 0, img.grid_h, img.height);
  const int64_t y1 = cell_start(i + 2 < img.grid_h ? i + 2 : img.grid_h, img.grid_h, img.height);
  const int64_t x0 = cell_start(j > 0 ? j - 1 : 0, img.grid_w, img.width);
  const int64_t x1 = cell_start(j + 2 < img.grid_w ? j + 2 : img.grid_w, img.grid_w, img.width);
  double sum[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t count = 0;
  for (int64_t y = y0; y < y1; ++y) {
    for (int64_t x = x0; x < x1; ++x) {
      if (assign[y * img.width + x] != k) continue;
      const float* lab = img.lab + (y * img.width + x) * 3;
      sum[0] += lab[0];
      sum[1] += lab[1];
      sum[2] += lab[2];
      sum[3] += static_cast<double>(y);
      sum[4] += static_cast<double>(x);
      ++count;
    }
  }
  if (count == 0) return;
  for (int c = 0; c < 5; ++c) centre[k * 5 + c] = sum[c] / static_cast<double>(count);
}

// One propagation step at pixel p: its piece becomes the smallest among its own and its equally assigned
// 4-neighbours', then follows one pointer (the piece of a piece's first pixel is a smaller or equal member).
// Returns whether it changed. Neighbours may be written concurrently on the device: values only decrease and are
// always members of the piece, so a stale read only delays the fixed point.
HOST_DEVICE_INLINE bool propagate_pixel(const SlicSlot& img, const int32_t* assign, volatile int32_t* piece,
                                        int64_t p) {
  const int64_t y = p / img.width, x = p % img.width;
  const int32_t a = assign[p], old = piece[p];
  int32_t m = old;
  if (x > 0 && assign[p - 1] == a && piece[p - 1] < m) m = piece[p - 1];
  if (x + 1 < img.width && assign[p + 1] == a && piece[p + 1] < m) m = piece[p + 1];
  if (y > 0 && assign[p - img.width] == a && piece[p - img.width] < m) m = piece[p - img.width];
  if (y + 1 < img.height && assign[p + img.width] == a && piece[p + img.width] < m) m = piece[p + img.width];
  m = piece[m] < m ? piece[m] : m;
  if (m == old) return false;
  piece[p] = m;
  return true;
}

// The kept piece that the piece first pixel r ends in (step 4).
HOST_DEVICE_INLINE int32_t kept_piece(const SlicSlot& img, const int32_t* piece, const int32_t* size, int32_t r) {
  while (r != 0 && size[r] < img.min_size) r = piece[r % img.width ? r - 1 : r - img.width];
  return r;
}

// Team: lane, lanes, sync() (all lanes reach it), sum(x) (x summed over the lanes, returned to every lane).
template <class Team>
HOST_DEVICE_INLINE void slic_image(Team& team, const SlicSlot& img, int32_t iterations, const SlicScratch& s) {
  const int64_t pixels = img.height * img.width, centres = img.grid_h * img.grid_w;
  double* centre = s.centres + img.centre_offset * 5;
  int32_t* assign = s.assign + img.pixel_offset;
  int32_t* piece = s.piece + img.pixel_offset;
  int32_t* size = s.size + img.pixel_offset;
  int32_t* out = img.labels;
  // 1. seeds
  for (int64_t k = team.lane; k < centres; k += team.lanes) {
    const int64_t i = k / img.grid_w, j = k % img.grid_w;
    const int64_t y = (cell_start(i, img.grid_h, img.height) + cell_start(i + 1, img.grid_h, img.height) - 1) / 2;
    const int64_t x = (cell_start(j, img.grid_w, img.width) + cell_start(j + 1, img.grid_w, img.width) - 1) / 2;
    const float* lab = img.lab + (y * img.width + x) * 3;
    double* c = centre + k * 5;
    c[0] = lab[0];
    c[1] = lab[1];
    c[2] = lab[2];
    c[3] = static_cast<double>(y);
    c[4] = static_cast<double>(x);
  }
  team.sync();
  // 2. k-means rounds, then the last assignment
  for (int32_t round = 0; round <= iterations; ++round) {
    for (int64_t p = team.lane; p < pixels; p += team.lanes)
      assign[p] = nearest_centre(img, centre, p / img.width, p % img.width);
    team.sync();
    if (round == iterations) break;
    for (int64_t k = team.lane; k < centres; k += team.lanes) update_centre(img, assign, centre, k);
    team.sync();
  }
  // 3. connectivity: alternate sweep directions until a sweep changes nothing
  for (int64_t p = team.lane; p < pixels; p += team.lanes) {
    piece[p] = static_cast<int32_t>(p);
    size[p] = 0;
  }
  team.sync();
  for (int64_t sweep = 0;; ++sweep) {
    double changed = 0.0;
    for (int64_t t = team.lane; t < pixels; t += team.lanes)
      changed += propagate_pixel(img, assign, piece, sweep % 2 ? pixels - 1 - t : t) ? 1.0 : 0.0;
    if (team.sum(changed) == 0.0) break;  // sum synchronises the lanes
  }
  for (int64_t p = team.lane; p < pixels; p += team.lanes) add_count(size + piece[p], 1);
  team.sync();
  // 4. small pieces join their adjacent piece
  for (int64_t p = team.lane; p < pixels; p += team.lanes) out[p] = kept_piece(img, piece, size, piece[p]);
  team.sync();
  // 5. numbering: kept pieces (out[p] == p) counted per row, rows' starts by one lane, then numbered along rows
  for (int64_t y = team.lane; y < img.height; y += team.lanes) {
    int32_t count = 0;
    for (int64_t p = y * img.width; p < (y + 1) * img.width; ++p) count += out[p] == p;
    size[y] = count;
  }
  team.sync();
  if (team.lane == 0) {
    int32_t start = 0;
    for (int64_t y = 0; y < img.height; ++y) {
      const int32_t count = size[y];
      size[y] = start;
      start += count;
    }
  }
  team.sync();
  for (int64_t y = team.lane; y < img.height; y += team.lanes) {
    int32_t number = size[y];
    for (int64_t p = y * img.width; p < (y + 1) * img.width; ++p)
      if (out[p] == p) piece[p] = number++;
  }
  team.sync();
  for (int64_t p = team.lane; p < pixels; p += team.lanes) out[p] = piece[out[p]];
}

// Launchers: slots (host memory) with lab, labels and the sizes set (grid, min_size, weight); plan_slic fills the
// offsets and returns the batch's (pixels, centres). Host pointers for the CPU launcher, device pointers for CUDA.
inline void plan_slic(SlicSlot* slots, int64_t num_images, int64_t* pixels, int64_t* centres) {
  *pixels = *centres = 0;
  for (int64_t b = 0; b < num_images; ++b) {
    slots[b].pixel_offset = *pixels;
    slots[b].centre_offset = *centres;
    *pixels += slots[b].height * slots[b].width;
    *centres += slots[b].grid_h * slots[b].grid_w;
  }
}

void slic_cpu(SlicSlot* slots, int64_t num_images, int32_t iterations, int num_threads);
void slic_cuda(SlicSlot* slots, int64_t num_images, int32_t iterations, int device, void* stream);

}  // namespace moduseg
