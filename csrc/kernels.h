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
// groups (num_groups widths summing to dim, or none): feature groups (layers) each L2-normalised before the whole
// vector is; with normalize = false nothing is normalised.
void soft_mask_pool_cpu(const float* features, int64_t grid_h, int64_t grid_w, int64_t dim, const int32_t* atoms,
                        int64_t height, int64_t width, int64_t num_atoms, const uint8_t* members, int64_t count,
                        int64_t stride, bool hard, double eps, bool normalize, const int64_t* groups,
                        int64_t num_groups, float* out, int num_threads);

// Class-specific greedy mask NMS (IoU > iou_threshold with a kept region of the same class suppresses; order: score
// descending, ties by index) and confidence-priority rasterisation (a pixel keeps the first kept region that covers
// it). keep: count bytes (0/1); label_map, owner: height x width int32.
void mask_nms_raster_cpu(const int32_t* atoms, int64_t height, int64_t width, int64_t num_atoms,
                         const uint8_t* members, int64_t count, const int32_t* classes, const double* scores,
                         double iou_threshold, int32_t background, uint8_t* keep, int32_t* label_map, int32_t* owner,
                         int num_threads);

// Agglomerative merging of adjacent regions, closest pair first, until the region count reaches the smallest of
// `levels` (sorted descending). distance(i, j) = (1 - cos(f_i, f_j)) + colour_weight * |c_i - c_j| / 100
// + size_weight * min(a_i, a_j) / total area, with f the normalised area-weighted sum of unit leaf features and c the
// area-weighted mean colour; ties go to the smaller node ids. Nodes 0..count-1 are the leaves, node count + t is made
// by merge t. Outputs (capacity 2 * count - 1): parent (-1 for roots), height (merge distance), area, coherence
// (|sum_l a_l f_l| / sum_l a_l over the node's leaves); snapshots[k * count + leaf]: the node holding the leaf when
// the region count first reached levels[k] (the last partition if merging ran out of adjacent pairs first).
void merge_regions_cpu(const int64_t* edges, int64_t num_edges, const double* leaf_area, const float* leaf_features,
                       int64_t dim, const float* leaf_colour, int64_t channels, int64_t count,
                       const int64_t* levels, int64_t num_levels, double colour_weight, double size_weight,
                       int64_t* parent, double* height, double* area, double* coherence, int32_t* snapshots,
                       int64_t* num_nodes);

}  // namespace moduseg
