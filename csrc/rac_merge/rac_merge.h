// The embedded proposer's merging of adjacent regions as parallel rounds (reciprocal agglomerative clustering),
// batched over images, one body for both launchers, run per image by a Team of lanes (one lane on the CPU, a thread
// block on the GPU). The distance is merge_regions's (merge_regions/merge_regions.h):
//   d(i, j) = (1 - cos(f_i, f_j)) + colour_weight * |c_i - c_j| / 100 + size_weight * min(a_i, a_j) / A.
// Pairs are ordered by the key (d, min id, max id). A round:
//   1. every live node with a live neighbour finds its nearest one by that key (per leaf edge joining two nodes:
//      an order-preserving integer key of d is min-ed into both ends, then the other end's id among the edges that
//      reach that minimum; both mins are order-free, so the result does not depend on the schedule);
//   2. the mutual pairs (i nearest to j and j to i, i < j) are sorted by key; the first k = min(pairs, regions -
//      smallest level) merge, the t-th making node `created + t` (parent, height d, area, features, colour as in
//      merge_regions); a level reached inside the round is snapshot after exactly the merges that reach it;
//   3. every leaf moves to its node's new node.
// Rounds repeat until the smallest level is reached or no two live nodes are adjacent. The globally smallest pair
// is always mutual, so every round with an adjacent pair merges at least once.
// The NumPy twin that defines the result is engine.reference.merge_regions_rac.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "host_device.h"

namespace moduseg {

constexpr int kMaxLevels = 16;

// One image's region graph (host or device pointers) and its slices of the batch's arrays.
struct MergeSlot {
  const int64_t* edges = nullptr;  // num_edges x 2 leaf pairs
  const double* leaf_area = nullptr;
  const float* leaf_features = nullptr;  // count x dim
  const float* leaf_colour = nullptr;    // count x channels
  int64_t num_edges = 0, count = 0;
  int64_t image = 0;        // its index in the batch (per-image scratch and num_nodes)
  int64_t leaf_offset = 0;  // first leaf's slot in per-leaf arrays (snapshots: num_levels slots a leaf)
  int64_t edge_offset = 0;  // first edge's slot in per-edge scratch
  int64_t node_offset = 0;  // first node's slot in per-node arrays (capacity max(2 count - 1, 1))
};

struct MergeArgs {
  int64_t dim = 0, channels = 0, num_levels = 0;
  int64_t levels[kMaxLevels] = {};  // descending
  double colour_weight = 1.0, size_weight = 3.0;
  // outputs: per node (batch node slots), per leaf x level, per image
  int64_t* parent = nullptr;
  double* height = nullptr;
  double* area = nullptr;
  double* coherence = nullptr;
  int32_t* snapshots = nullptr;  // per image: num_levels x count, from leaf_offset * num_levels
  int64_t* num_nodes = nullptr;
};

struct MergeScratch {
  double* feature = nullptr;      // per node x dim: normalised
  double* feature_sum = nullptr;  // per node x dim: area-weighted sum of unit leaf features
  double* colour = nullptr;       // per node x channels
  uint64_t* best_key = nullptr;   // per node
  int32_t* best_other = nullptr;  // per node
  int32_t* merged_into = nullptr;  // per node: the node it merged into, -1 while alive
  int32_t* node_of_leaf = nullptr;  // per leaf
  uint64_t* edge_key = nullptr;     // per edge (batch edge slots): this round's distance key, kNoKey inside a node
  int32_t* pair = nullptr;          // per leaf: 2 ids a found pair (at most count / 2 pairs)
  double* pair_distance = nullptr;  // per leaf
  int32_t* sorted = nullptr;        // per leaf: the found pairs in key order
  int32_t* found = nullptr;         // per image: pairs found this round
  double* total_area = nullptr;     // per image
};

constexpr uint64_t kNoKey = ~uint64_t{0};
constexpr int32_t kNoNode = 0x7fffffff;

// A double as an unsigned integer of the same order (negative values reversed below the positive ones).
HOST_DEVICE_INLINE uint64_t order_key(double d) {
  uint64_t bits;
#ifdef __CUDA_ARCH__
  bits = static_cast<uint64_t>(__double_as_longlong(d));
#else
  std::memcpy(&bits, &d, sizeof bits);
#endif
  return bits >> 63 ? ~bits : bits | (uint64_t{1} << 63);
}

// Order-free minimum and counter (atomic on the device; on the host one lane works per image).
HOST_DEVICE_INLINE void min_key(uint64_t* target, uint64_t value) {
#ifdef __CUDA_ARCH__
  atomicMin(reinterpret_cast<unsigned long long*>(target), static_cast<unsigned long long>(value));
#else
  if (value < *target) *target = value;
#endif
}

HOST_DEVICE_INLINE void min_id(int32_t* target, int32_t value) {
#ifdef __CUDA_ARCH__
  atomicMin(target, value);
#else
  if (value < *target) *target = value;
#endif
}

HOST_DEVICE_INLINE int32_t fetch_add(int32_t* target, int32_t value) {
#ifdef __CUDA_ARCH__
  return atomicAdd(target, value);
#else
  const int32_t old = *target;
  *target += value;
  return old;
#endif
}

// merge_regions's distance between nodes i and j of the image whose node slots start at `node`.
HOST_DEVICE_INLINE double rac_distance(const MergeArgs& args, const MergeScratch& s, int64_t node, double total,
                                       int64_t i, int64_t j) {
  const double* fi = s.feature + (node + i) * args.dim;
  const double* fj = s.feature + (node + j) * args.dim;
  double dot = 0.0;
  for (int64_t d = 0; d < args.dim; ++d) dot += fi[d] * fj[d];
  const double* ci = s.colour + (node + i) * args.channels;
  const double* cj = s.colour + (node + j) * args.channels;
  double sq = 0.0;
  for (int64_t c = 0; c < args.channels; ++c) sq += (ci[c] - cj[c]) * (ci[c] - cj[c]);
  const double ai = args.area[node + i], aj = args.area[node + j];
  return (1.0 - dot) + args.colour_weight / 100.0 * sqrt(sq) + args.size_weight * (ai < aj ? ai : aj) / total;
}

// Normalises node n's feature sum into its feature.
HOST_DEVICE_INLINE void normalise_node(const MergeArgs& args, const MergeScratch& s, int64_t n) {
  double sq = 0.0;
  for (int64_t d = 0; d < args.dim; ++d) sq += s.feature_sum[n * args.dim + d] * s.feature_sum[n * args.dim + d];
  const double norm = sqrt(sq) > 1e-12 ? sqrt(sq) : 1e-12;
  for (int64_t d = 0; d < args.dim; ++d) s.feature[n * args.dim + d] = s.feature_sum[n * args.dim + d] / norm;
}

// Whether pair u precedes pair v in key order (distance, then ids).
HOST_DEVICE_INLINE bool pair_before(const MergeScratch& s, int64_t leaf, int64_t u, int64_t v) {
  const double du = s.pair_distance[leaf + u], dv = s.pair_distance[leaf + v];
  if (du != dv) return du < dv;
  const int32_t* pu = s.pair + 2 * (leaf + u);
  const int32_t* pv = s.pair + 2 * (leaf + v);
  return pu[0] != pv[0] ? pu[0] < pv[0] : pu[1] < pv[1];
}

// Snapshot of the partition after the first `merges` merges of the round (merged_into already set for them).
template <class Team>
HOST_DEVICE_INLINE void snapshot(Team& team, const MergeSlot& g, const MergeArgs& args, const MergeScratch& s,
                                 int64_t level, int64_t created, int64_t merges) {
  int32_t* out = args.snapshots + g.leaf_offset * args.num_levels + level * g.count;
  for (int64_t l = team.lane; l < g.count; l += team.lanes) {
    const int32_t n = s.node_of_leaf[g.leaf_offset + l];
    const int32_t into = s.merged_into[g.node_offset + n];
    out[l] = into >= 0 && into < created + merges ? into : n;
  }
}

template <class Team>
HOST_DEVICE_INLINE void merge_image(Team& team, const MergeSlot& g, const MergeArgs& args, const MergeScratch& s) {
  const int64_t node = g.node_offset, leaf = g.leaf_offset, dim = args.dim, channels = args.channels;
  const int64_t capacity = g.count > 0 ? 2 * g.count - 1 : 1;
  for (int64_t n = team.lane; n < capacity; n += team.lanes) {
    args.parent[node + n] = -1;
    args.height[node + n] = 0.0;
    s.merged_into[node + n] = -1;
  }
  for (int64_t l = team.lane; l < g.count; l += team.lanes) {
    const int64_t n = node + l;
    double sq = 0.0;
    for (int64_t d = 0; d < dim; ++d) {
      const double f = g.leaf_features[l * dim + d];
      sq += f * f;
    }
    const double norm = sqrt(sq) > 1e-12 ? sqrt(sq) : 1e-12;
    args.area[n] = g.leaf_area[l];
    for (int64_t d = 0; d < dim; ++d) {
      s.feature[n * dim + d] = g.leaf_features[l * dim + d] / norm;
      s.feature_sum[n * dim + d] = s.feature[n * dim + d] * g.leaf_area[l];
    }
    for (int64_t c = 0; c < channels; ++c) s.colour[n * channels + c] = g.leaf_colour[l * channels + c];
    s.node_of_leaf[leaf + l] = static_cast<int32_t>(l);
  }
  if (team.lane == 0) {
    double total = 0.0;
    for (int64_t l = 0; l < g.count; ++l) total += g.leaf_area[l];
    s.total_area[g.image] = total;
  }
  team.sync();
  const double total = s.total_area[g.image];
  int32_t* found = s.found + g.image;
  int64_t regions = g.count, created = g.count, level = 0;
  for (; level < args.num_levels && regions <= args.levels[level]; ++level)  // cuts at or above the leaf count
    snapshot(team, g, args, s, level, created, 0);
  const int64_t stop = args.num_levels ? args.levels[args.num_levels - 1] : 1;
  while (regions > stop) {
    // 1. every live node's nearest neighbour: the smallest distance key, then the smallest id reaching it
    for (int64_t n = team.lane; n < created; n += team.lanes) {
      s.best_key[node + n] = kNoKey;
      s.best_other[node + n] = kNoNode;
    }
    if (team.lane == 0) *found = 0;
    team.sync();
    uint64_t* edge_key = s.edge_key + g.edge_offset;
    for (int64_t e = team.lane; e < g.num_edges; e += team.lanes) {
      const int32_t a = s.node_of_leaf[leaf + g.edges[2 * e]], b = s.node_of_leaf[leaf + g.edges[2 * e + 1]];
      edge_key[e] = a == b ? kNoKey : order_key(rac_distance(args, s, node, total, a, b));
      if (a == b) continue;
      min_key(s.best_key + node + a, edge_key[e]);
      min_key(s.best_key + node + b, edge_key[e]);
    }
    team.sync();
    for (int64_t e = team.lane; e < g.num_edges; e += team.lanes) {
      const int32_t a = s.node_of_leaf[leaf + g.edges[2 * e]], b = s.node_of_leaf[leaf + g.edges[2 * e + 1]];
      if (a == b) continue;
      const uint64_t key = edge_key[e];
      if (key == s.best_key[node + a]) min_id(s.best_other + node + a, b);
      if (key == s.best_key[node + b]) min_id(s.best_other + node + b, a);
    }
    team.sync();
    // 2. mutual pairs, listed in any order, then sorted by key; the first `merges` are marked
    for (int64_t n = team.lane; n < created; n += team.lanes) {
      const int32_t m = s.best_other[node + n];
      if (s.merged_into[node + n] >= 0 || m == kNoNode || m <= n || s.best_other[node + m] != n) continue;
      const int64_t t = fetch_add(found, 1);
      s.pair[2 * (leaf + t)] = static_cast<int32_t>(n);
      s.pair[2 * (leaf + t) + 1] = m;
      s.pair_distance[leaf + t] = rac_distance(args, s, node, total, n, m);
    }
    team.sync();
    const int64_t pairs = *found;
    if (pairs == 0) break;  // no two live nodes are adjacent
    const int64_t merges = pairs < regions - stop ? pairs : regions - stop;
    for (int64_t t = team.lane; t < pairs; t += team.lanes) {
      int64_t rank = 0;
      for (int64_t u = 0; u < pairs; ++u) rank += pair_before(s, leaf, u, t);
      s.sorted[leaf + rank] = static_cast<int32_t>(t);
      if (rank < merges) {
        s.merged_into[node + s.pair[2 * (leaf + t)]] = static_cast<int32_t>(created + rank);
        s.merged_into[node + s.pair[2 * (leaf + t) + 1]] = static_cast<int32_t>(created + rank);
      }
    }
    team.sync();
    for (; level < args.num_levels && regions - merges <= args.levels[level]; ++level)
      snapshot(team, g, args, s, level, created, regions - args.levels[level]);
    for (int64_t t = team.lane; t < merges; t += team.lanes) {  // the new nodes
      const int64_t p = s.sorted[leaf + t], n = node + created + t;
      const int64_t i = node + s.pair[2 * (leaf + p)], j = node + s.pair[2 * (leaf + p) + 1];
      args.parent[i] = args.parent[j] = created + t;
      args.height[n] = s.pair_distance[leaf + p];
      args.area[n] = args.area[i] + args.area[j];
      for (int64_t d = 0; d < dim; ++d)
        s.feature_sum[n * dim + d] = s.feature_sum[i * dim + d] + s.feature_sum[j * dim + d];
      normalise_node(args, s, n);
      const double wi = args.area[i] / args.area[n], wj = args.area[j] / args.area[n];
      for (int64_t c = 0; c < channels; ++c)
        s.colour[n * channels + c] = wi * s.colour[i * channels + c] + wj * s.colour[j * channels + c];
    }
    team.sync();
    // 3. leaves follow their nodes
    for (int64_t l = team.lane; l < g.count; l += team.lanes) {
      const int32_t into = s.merged_into[node + s.node_of_leaf[leaf + l]];
      if (into >= 0) s.node_of_leaf[leaf + l] = into;
    }
    team.sync();
    created += merges;
    regions -= merges;
  }
  for (; level < args.num_levels; ++level)  // cuts never reached keep the last partition
    snapshot(team, g, args, s, level, created, 0);
  for (int64_t n = team.lane; n < created; n += team.lanes) {
    // leaf features are unit vectors, so sum_l a_l cos(f_l, mean) = |sum_l a_l f_l|: the area-weighted coherence
    double sq = 0.0;
    for (int64_t d = 0; d < dim; ++d) sq += s.feature_sum[(node + n) * dim + d] * s.feature_sum[(node + n) * dim + d];
    const double area = args.area[node + n] > 1e-12 ? args.area[node + n] : 1e-12;
    const double c = sqrt(sq) / area;
    args.coherence[node + n] = n < g.count ? 1.0 : c < 0.0 ? 0.0 : c > 1.0 ? 1.0 : c;
  }
  if (team.lane == 0) args.num_nodes[g.image] = created;
}

// Offsets of each image's slices; returns the batch's (leaves, nodes, edges).
inline void plan_merge(MergeSlot* slots, int64_t num_images, int64_t* leaves, int64_t* nodes, int64_t* edges) {
  *leaves = *nodes = *edges = 0;
  for (int64_t b = 0; b < num_images; ++b) {
    slots[b].image = b;
    slots[b].leaf_offset = *leaves;
    slots[b].node_offset = *nodes;
    slots[b].edge_offset = *edges;
    *edges += slots[b].num_edges;
    *leaves += slots[b].count;
    *nodes += slots[b].count > 0 ? 2 * slots[b].count - 1 : 1;
  }
}

// Launchers: slots (host memory) with the graphs' pointers and sizes; args' outputs sized by plan_merge. Host
// pointers for the CPU launcher, device pointers for the CUDA one.
void rac_merge_cpu(MergeSlot* slots, int64_t num_images, const MergeArgs& args, int num_threads);
void rac_merge_cuda(MergeSlot* slots, int64_t num_images, const MergeArgs& args, int device, void* stream);

}  // namespace moduseg
