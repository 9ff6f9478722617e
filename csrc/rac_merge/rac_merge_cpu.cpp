// CPU launcher of the merging rounds: merge_image with one lane per image, the images in an OpenMP loop.
#include <vector>

#include "cpu_parallel.h"
#include "rac_merge/rac_merge.h"

namespace moduseg {

void rac_merge_cpu(MergeSlot* slots, int64_t num_images, const MergeArgs& args, int num_threads) {
  int64_t leaves = 0, nodes = 0, edges = 0;
  plan_merge(slots, num_images, &leaves, &nodes, &edges);
  std::vector<double> feature(static_cast<size_t>(nodes * args.dim)), feature_sum(feature.size());
  std::vector<double> colour(static_cast<size_t>(nodes * args.channels));
  std::vector<uint64_t> best_key(static_cast<size_t>(nodes)), edge_key(static_cast<size_t>(edges));
  std::vector<int32_t> best_other(best_key.size()), merged_into(best_key.size());
  std::vector<int32_t> node_of_leaf(static_cast<size_t>(leaves)), pair(2 * node_of_leaf.size()),
      sorted(node_of_leaf.size()), found(static_cast<size_t>(num_images));
  std::vector<double> pair_distance(node_of_leaf.size()), total_area(found.size());
  const MergeScratch s{feature.data(),      feature_sum.data(), colour.data(),       best_key.data(),
                       best_other.data(),   merged_into.data(), node_of_leaf.data(), edge_key.data(),
                       pair.data(),         pair_distance.data(), sorted.data(),     found.data(),
                       total_area.data()};
  parallel_for_each(num_images, num_images > 1, num_threads, [&](int64_t b) {
    SerialTeam team;
    merge_image(team, slots[b], args, s);
  });
}

}  // namespace moduseg
