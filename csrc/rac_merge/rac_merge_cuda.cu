// CUDA launcher of the merging rounds: one thread block per image runs merge_image (the block is the Team), one
// kernel per batch (per kSlotsPerLaunch images). Compiled with -fmad=false (CMakeLists.txt): distances round as on
// the CPU, so the trees are the CPU's exactly.
#include "cuda_utils.cuh"
#include "rac_merge/rac_merge.h"

namespace moduseg {

namespace {

constexpr int kThreads = 256;

using MergeTable = LaunchTable<MergeSlot>;

__global__ void merge_kernel(const __grid_constant__ MergeTable table, MergeArgs args, MergeScratch s) {
  __shared__ double reduce[kThreads];
  BlockTeam team{threadIdx.x, blockDim.x, reduce};
  merge_image(team, table.slot[blockIdx.x], args, s);
}

}  // namespace

void rac_merge_cuda(MergeSlot* slots, int64_t num_images, const MergeArgs& args, int device, void* stream_handle) {
  int64_t leaves = 0, nodes = 0, edges = 0;
  plan_merge(slots, num_images, &leaves, &nodes, &edges);
  if (num_images == 0) return;
  DeviceGuard guard(device);
  auto stream = static_cast<cudaStream_t>(stream_handle);
  StreamBuffer feature(nodes * args.dim * sizeof(double), stream);
  StreamBuffer feature_sum(nodes * args.dim * sizeof(double), stream);
  StreamBuffer colour(nodes * args.channels * sizeof(double), stream), best_key(nodes * sizeof(uint64_t), stream);
  StreamBuffer best_other(nodes * sizeof(int32_t), stream), merged_into(nodes * sizeof(int32_t), stream);
  StreamBuffer node_of_leaf(leaves * sizeof(int32_t), stream), pair(2 * leaves * sizeof(int32_t), stream);
  StreamBuffer edge_key(edges * sizeof(uint64_t), stream);
  StreamBuffer pair_distance(leaves * sizeof(double), stream), sorted(leaves * sizeof(int32_t), stream);
  StreamBuffer found(num_images * sizeof(int32_t), stream), total_area(num_images * sizeof(double), stream);
  const MergeScratch s{feature.as<double>(),      feature_sum.as<double>(), colour.as<double>(),
                       best_key.as<uint64_t>(),   best_other.as<int32_t>(), merged_into.as<int32_t>(),
                       node_of_leaf.as<int32_t>(), edge_key.as<uint64_t>(),  pair.as<int32_t>(),
                       pair_distance.as<double>(), sorted.as<int32_t>(),     found.as<int32_t>(),
                       total_area.as<double>()};
  for_each_chunk<MergeTable>(slots, num_images, [&](const MergeTable& table) {
    merge_kernel<<<static_cast<unsigned>(table.count), kThreads, 0, stream>>>(table, args, s);
    launched("rac_merge: merge_kernel");
  });
}

}  // namespace moduseg
