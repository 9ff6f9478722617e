// CUDA launcher of the vote: one thread per query, one kernel per batch.
#include "cuda_utils.cuh"
#include "vote/vote.h"

namespace moduseg {

namespace {

__global__ void vote_kernel(VoteArgs args) {
  const int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (q < args.queries) vote_query(args, q);
}

}  // namespace

void vote_cuda(const VoteArgs& args, int device, void* stream) {
  if (args.queries == 0) return;
  DeviceGuard guard(device);
  vote_kernel<<<blocks_for(args.queries, 128), 128, 0, static_cast<cudaStream_t>(stream)>>>(args);
  launched("vote: vote_kernel");
}

}  // namespace moduseg
