// SMFA (soft-masked feature aggregation) over regions made of atoms, batched over images:
//   out[n] = L2normalise(sum_p w_np F_p / (sum_p w_np + eps)),  w_np = (pixels of region n in patch p) / stride^2,
// pixels beyond the image counting as uncovered (the zero padding). hard = true is the ablation without SMFA:
// w_np = 1 if the centre pixel of patch p lies in region n. Feature groups (the layers of a multi-layer backbone)
// are each L2-normalised before the whole vector is; normalize = false returns the weighted mean.
//
// Two steps, each a body shared by both launchers:
//   1. patch_overlaps: per patch, the atoms inside it and their pixel counts (fixed capacity stride^2 per patch);
//   2. pool_region: per region, the patch weights from those lists (patch p's start[p]-th to start[p] + found[p]-th
//      entries) and the weighted sum in double, patch by patch
//      in raster order, by a Team of lanes that split the feature dimensions (one lane on the CPU, a thread block on
//      the GPU). The sums of every lane follow the same order, so both devices agree to rounding of the norms.
// The NumPy twin that defines the result is engine.reference.soft_mask_pool_reference.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace moduseg {

constexpr int kMaxGroups = 16;  // feature groups (backbone layers) a vector may have
constexpr int kPatchTile = 256;  // patch weights a team computes together before accumulating them

struct SmfaArgs {
  int64_t dim = 0, stride = 1;
  bool hard = false, normalize = true;
  double eps = 1e-8;
  int64_t num_groups = 0;
  int64_t groups[kMaxGroups] = {};
  int32_t capacity = 1;  // most atoms a patch can hold: stride^2 (1 with hard pooling)
};

// Step 1: the atoms overlapping patch `patch` of an image and their pixel counts; returns how many (<= capacity).
HOST_DEVICE_INLINE int32_t patch_overlaps(const ImageSlot& img, const SmfaArgs& args, int64_t patch, int32_t* atom,
                                          int32_t* pixels) {
  const int64_t by = patch / img.grid_w, bx = patch % img.grid_w, s = args.stride;
  if (args.hard) {  // the centre pixel only (a centre in the zero padding covers nothing)
    const int64_t y = by * s + s / 2, x = bx * s + s / 2;
    if (y >= img.height || x >= img.width) return 0;
    const int32_t a = img.atoms[y * img.width + x];
    if (a < 0 || a >= img.num_atoms) return 0;
    atom[0] = a;
    pixels[0] = 1;
    return 1;
  }
  int32_t found = 0, last = -1;
  const int64_t y1 = by * s + s < img.height ? by * s + s : img.height;
  const int64_t x1 = bx * s + s < img.width ? bx * s + s : img.width;
  for (int64_t y = by * s; y < y1; ++y) {
    const int32_t* row = img.atoms + y * img.width;
    for (int64_t x = bx * s; x < x1; ++x) {
      const int32_t a = row[x];
      if (a < 0 || a >= img.num_atoms) continue;
      if (last >= 0 && atom[last] == a) {  // atoms run along rows: most pixels repeat the last one
        ++pixels[last];
        continue;
      }
      int32_t k = 0;
      while (k < found && atom[k] != a) ++k;
      if (k == found) {
        atom[found] = a;
        pixels[found] = 0;
        ++found;
      }
      ++pixels[k];
      last = k;
    }
  }
  return found;
}

// The weight of patch `patch` for the region whose membership row is `member`: its covered pixels / stride^2.
HOST_DEVICE_INLINE double patch_weight(const SmfaArgs& args, const uint8_t* member, const int32_t* atom,
                                       const int32_t* pixels, int32_t found) {
  int64_t covered = 0;
  for (int32_t k = 0; k < found; ++k)
    if (member[atom[k]]) covered += pixels[k];
  const double block_area = args.hard ? 1.0 : static_cast<double>(args.stride * args.stride);
  return static_cast<double>(covered) / block_area;
}

// Step 2: region n of an image. `acc` holds this lane's dimensions d = lane, lane + lanes, ...; `tile` is
// kPatchTile doubles shared by the team. Writes out[d] for the lane's dimensions.
// Team: lane, lanes, sync() (all lanes reach it), sum(x) (the sum of x over the lanes, returned to every lane).
template <class Team>
HOST_DEVICE_INLINE void pool_region(Team& team, const ImageSlot& img, int64_t n, const SmfaArgs& args,
                                    const int32_t* overlap_atom, const int32_t* overlap_pixels,
                                    const int64_t* overlap_start, const int32_t* overlap_found, double* acc,
                                    double* tile, float* out) {
  const int64_t lane = team.lane, lanes = team.lanes, dim = args.dim;
  const int64_t patches = img.grid_h * img.grid_w;
  const uint8_t* member = img.members + n * img.num_atoms;
  for (int64_t d = lane, j = 0; d < dim; d += lanes, ++j) acc[j] = 0.0;
  double weight_sum = 0.0;
  for (int64_t t0 = 0; t0 < patches; t0 += kPatchTile) {
    const int64_t t1 = t0 + kPatchTile < patches ? t0 + kPatchTile : patches;
    for (int64_t p = t0 + lane; p < t1; p += lanes) {
      const int64_t slot = overlap_start[img.patch_offset + p];
      tile[p - t0] = patch_weight(args, member, overlap_atom + slot, overlap_pixels + slot,
                                  overlap_found[img.patch_offset + p]);
    }
    team.sync();
    for (int64_t p = t0; p < t1; ++p) {
      const double w = tile[p - t0];
      if (w == 0.0) continue;
      weight_sum += w;
      const float* f = img.features + p * dim;
      for (int64_t d = lane, j = 0; d < dim; d += lanes, ++j) acc[j] += w * static_cast<double>(f[d]);
    }
    team.sync();
  }
  const double denominator = weight_sum + args.eps;
  for (int64_t d = lane, j = 0; d < dim; d += lanes, ++j) acc[j] /= denominator;
  if (args.normalize) {
    for (int64_t g = 0, start = 0; g < args.num_groups; start += args.groups[g], ++g) {
      const int64_t end = start + args.groups[g];
      double part = 0.0;
      for (int64_t d = lane, j = 0; d < dim; d += lanes, ++j)
        if (d >= start && d < end) part += acc[j] * acc[j];
      const double norm = fmax(sqrt(team.sum(part)), 1e-12);
      for (int64_t d = lane, j = 0; d < dim; d += lanes, ++j)
        if (d >= start && d < end) acc[j] /= norm;
    }
  }
  double part = 0.0;
  for (int64_t d = lane, j = 0; d < dim; d += lanes, ++j) part += acc[j] * acc[j];
  const double total = team.sum(part);  // every lane calls sum, normalised or not
  const double norm = args.normalize ? fmax(sqrt(total), 1e-12) : 1.0;
  for (int64_t d = lane, j = 0; d < dim; d += lanes, ++j) out[d] = static_cast<float>(acc[j] / norm);
}

// Launchers: slots (host memory) describe num_images images; out is (sum of counts) x dim float32, on the host
// for the CPU launcher, on the device for the CUDA one (every pointer in the slots likewise).
void soft_mask_pool_cpu(ImageSlot* slots, int64_t num_images, const SmfaArgs& args, float* out, int num_threads);
void soft_mask_pool_cuda(ImageSlot* slots, int64_t num_images, const SmfaArgs& args, float* out, int device,
                         void* stream);

}  // namespace moduseg
