// CPU agglomerative merging of adjacent regions (the embedded proposer's hierarchy): the closest adjacent pair merges
// first, distances are recomputed for the merged node's neighbours, stale heap entries are skipped. A region's
// feature is the normalised area-weighted sum of its leaves' unit features, its colour the area-weighted mean.
#include <algorithm>
#include <cmath>
#include <queue>
#include <tuple>
#include <vector>

#include "merge_regions/merge_regions.h"

namespace moduseg {

namespace {

using Entry = std::tuple<double, int64_t, int64_t>;  // (distance, i, j): ties go to the smaller i, then j

struct Nodes {
  int64_t dim, channels;
  double total_area, colour_weight, size_weight;
  std::vector<double> feature, feature_sum, colour, area;

  double distance(int64_t i, int64_t j) const {
    const double* fi = feature.data() + i * dim;
    const double* fj = feature.data() + j * dim;
    double dot = 0.0;
    for (int64_t d = 0; d < dim; ++d) dot += fi[d] * fj[d];
    const double* ci = colour.data() + i * channels;
    const double* cj = colour.data() + j * channels;
    double sq = 0.0;
    for (int64_t c = 0; c < channels; ++c) sq += (ci[c] - cj[c]) * (ci[c] - cj[c]);
    return (1.0 - dot) + colour_weight / 100.0 * std::sqrt(sq) +
           size_weight * std::min(area[i], area[j]) / total_area;
  }
};

}  // namespace

void merge_regions_cpu(const int64_t* edges, int64_t num_edges, const double* leaf_area, const float* leaf_features,
                       int64_t dim, const float* leaf_colour, int64_t channels, int64_t count,
                       const int64_t* levels, int64_t num_levels, double colour_weight, double size_weight,
                       int64_t* parent, double* height, double* area, double* coherence, int32_t* snapshots,
                       int64_t* num_nodes) {
  const int64_t capacity = std::max<int64_t>(2 * count - 1, 1);
  Nodes nodes{dim, channels, 0.0, colour_weight, size_weight, std::vector<double>(capacity * dim, 0.0),
              std::vector<double>(capacity * dim, 0.0), std::vector<double>(capacity * channels, 0.0),
              std::vector<double>(capacity, 0.0)};
  for (int64_t i = 0; i < count; ++i) {
    nodes.area[i] = leaf_area[i];
    nodes.total_area += leaf_area[i];
    double sq = 0.0;
    for (int64_t d = 0; d < dim; ++d) sq += static_cast<double>(leaf_features[i * dim + d]) * leaf_features[i * dim + d];
    const double norm = std::max(std::sqrt(sq), 1e-12);
    for (int64_t d = 0; d < dim; ++d) {
      nodes.feature[i * dim + d] = leaf_features[i * dim + d] / norm;
      nodes.feature_sum[i * dim + d] = nodes.feature[i * dim + d] * leaf_area[i];
    }
    for (int64_t c = 0; c < channels; ++c) nodes.colour[i * channels + c] = leaf_colour[i * channels + c];
  }
  std::fill(parent, parent + capacity, int64_t{-1});
  std::fill(height, height + capacity, 0.0);

  std::vector<std::vector<int64_t>> neighbours(static_cast<size_t>(capacity));
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  for (int64_t e = 0; e < num_edges; ++e) {
    const int64_t a = edges[2 * e], b = edges[2 * e + 1];
    neighbours[a].push_back(b);
    neighbours[b].push_back(a);
    heap.emplace(nodes.distance(a, b), a, b);
  }
  std::vector<uint8_t> alive(static_cast<size_t>(capacity), 0);
  std::fill(alive.begin(), alive.begin() + count, uint8_t{1});
  std::vector<int32_t> leaf_node(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) leaf_node[i] = static_cast<int32_t>(i);
  std::vector<std::vector<int32_t>> members(static_cast<size_t>(capacity));
  for (int64_t i = 0; i < count; ++i) members[i].push_back(static_cast<int32_t>(i));

  // levels are sorted descending; the partition is recorded when the region count first reaches each
  int64_t next_level = 0, regions = count, created = count;
  auto record = [&]() {
    while (next_level < num_levels && regions <= levels[next_level]) {
      std::copy(leaf_node.begin(), leaf_node.end(), snapshots + next_level * count);
      ++next_level;
    }
  };
  record();
  const int64_t stop = num_levels ? levels[num_levels - 1] : 1;  // merging past the coarsest cut builds unused nodes
  while (!heap.empty() && regions > stop) {
    const auto [d, i, j] = heap.top();
    heap.pop();
    if (!alive[i] || !alive[j]) continue;
    const int64_t n = created++;
    alive[i] = alive[j] = 0;
    alive[n] = 1;
    parent[i] = parent[j] = n;
    height[n] = d;
    nodes.area[n] = nodes.area[i] + nodes.area[j];
    double sq = 0.0;
    for (int64_t k = 0; k < dim; ++k) {
      const double s = nodes.feature_sum[i * dim + k] + nodes.feature_sum[j * dim + k];
      nodes.feature_sum[n * dim + k] = s;
      sq += s * s;
    }
    const double norm = std::max(std::sqrt(sq), 1e-12);
    for (int64_t k = 0; k < dim; ++k) nodes.feature[n * dim + k] = nodes.feature_sum[n * dim + k] / norm;
    const double wi = nodes.area[i] / nodes.area[n], wj = nodes.area[j] / nodes.area[n];
    for (int64_t c = 0; c < channels; ++c)
      nodes.colour[n * channels + c] = wi * nodes.colour[i * channels + c] + wj * nodes.colour[j * channels + c];
    members[n] = std::move(members[i]);
    members[n].insert(members[n].end(), members[j].begin(), members[j].end());
    members[j].clear();
    for (int32_t leaf : members[n]) leaf_node[leaf] = static_cast<int32_t>(n);
    // the merged node's neighbours: those of i and j (alive ones), without i and j, each once
    std::vector<int64_t> around;
    for (int64_t k : neighbours[i])
      if (alive[k]) around.push_back(k);
    for (int64_t k : neighbours[j])
      if (alive[k]) around.push_back(k);
    std::sort(around.begin(), around.end());
    around.erase(std::unique(around.begin(), around.end()), around.end());
    for (int64_t k : around) {
      neighbours[k].push_back(n);
      heap.emplace(nodes.distance(n, k), n, k);
    }
    neighbours[n] = std::move(around);
    neighbours[i].clear();
    neighbours[j].clear();
    --regions;
    record();
  }
  *num_nodes = created;
  for (int64_t n = 0; n < created; ++n) {
    area[n] = nodes.area[n];
    // leaf features are unit vectors, so sum_l a_l cos(f_l, mean) = |sum_l a_l f_l|: the area-weighted coherence
    double sq = 0.0;
    for (int64_t k = 0; k < dim; ++k) sq += nodes.feature_sum[n * dim + k] * nodes.feature_sum[n * dim + k];
    coherence[n] = n < count ? 1.0 : std::min(1.0, std::max(0.0, std::sqrt(sq) / std::max(nodes.area[n], 1e-12)));
  }
  // cuts never reached (too few adjacencies to merge down to them) keep the last partition
  for (; next_level < num_levels; ++next_level)
    std::copy(leaf_node.begin(), leaf_node.end(), snapshots + next_level * count);
}

}  // namespace moduseg
