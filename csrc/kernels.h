// Declarations of the compiled ops shared by the bindings and the CPU (OpenMP) sources.
//
// Regions are unions of atoms: `atoms` is an H x W map of atom ids in [0, num_atoms) (a partition of the image:
// superpixels, connected components, the cells of overlapping masks) and `members` a count x num_atoms byte matrix
// (nonzero = the atom belongs to the region). Every op has a NumPy twin in engine/reference.py, written on the
// materialised H x W masks, that defines its result; engine/ops.py validates the inputs, so these functions trust
// shapes, dtypes, contiguity and atom ids.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moduseg {

// SMFA per region: out[n] = L2normalise(sum_p w_np F_p / (sum_p w_np + eps)), w_np = fraction of patch p's
// stride x stride pixels covered by region n (pixels beyond height, width count as uncovered: the zero padding).
// hard = true is the ablation without SMFA: w_np = 1 if the centre pixel of patch p lies in region n, else 0.
// features: grid_h x grid_w x dim float32 with grid_h = ceil(height / stride), grid_w = ceil(width / stride).
void soft_mask_pool_cpu(const float* features, int64_t grid_h, int64_t grid_w, int64_t dim, const int32_t* atoms,
                        int64_t height, int64_t width, int64_t num_atoms, const uint8_t* members, int64_t count,
                        int64_t stride, bool hard, double eps, bool normalize, float* out, int num_threads);

// Class-specific greedy mask NMS (IoU > iou_threshold with a kept region of the same class suppresses; order: score
// descending, ties by index) and confidence-priority rasterisation (a pixel keeps the first kept region that covers
// it). keep: count bytes (0/1); label_map, owner: height x width int32.
void mask_nms_raster_cpu(const int32_t* atoms, int64_t height, int64_t width, int64_t num_atoms,
                         const uint8_t* members, int64_t count, const int32_t* classes, const double* scores,
                         double iou_threshold, int32_t background, uint8_t* keep, int32_t* label_map, int32_t* owner,
                         int num_threads);

}  // namespace moduseg
