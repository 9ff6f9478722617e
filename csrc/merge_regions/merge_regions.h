// The embedded proposer's agglomerative merging of adjacent regions (CPU only for now: a sequential closest-pair
// loop). The NumPy twin that defines the result is engine.reference.merge_regions.
#pragma once

#include <cstdint>

namespace moduseg {

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
