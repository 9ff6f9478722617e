// CUDA batched mask NMS + confidence-priority rasteriser: masks are bit-packed with warp ballots (32 pixels a word,
// areas and touched word ranges on the fly), a pairwise kernel fills the same-class suppression table (one CUDA block
// per pair, popcount reduction), one block runs the greedy pass (stable rank by score, then the kept list), and the
// raster kernel gives each pixel the first kept mask, in processing order, that covers it.
#include <cuda_runtime.h>

#include "cuda_check.cuh"
#include "kernels.h"

namespace moduseg {

namespace {

constexpr int kThreads = 256;

__global__ void pack_kernel(const uint8_t* __restrict__ masks, int64_t pixels, int64_t words,
                            uint32_t* __restrict__ bits, unsigned long long* __restrict__ area,
                            int32_t* __restrict__ first, int32_t* __restrict__ last) {
  const int64_t n = blockIdx.y;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool covered = p < pixels && masks[n * pixels + p] != 0;
  const uint32_t word = __ballot_sync(0xFFFFFFFFu, covered);  // blockDim is a multiple of 32: whole warps
  if ((threadIdx.x & 31) == 0) {
    const int64_t w = p / 32;
    if (w < words) {
      bits[n * words + w] = word;
      if (word) {
        atomicAdd(&area[n], static_cast<unsigned long long>(__popc(word)));
        atomicMin(&first[n], static_cast<int32_t>(w));
        atomicMax(&last[n], static_cast<int32_t>(w));
      }
    }
  }
}

__global__ void init_ranges_kernel(int64_t count, int64_t words, int32_t* first, int32_t* last) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n < count) {
    first[n] = static_cast<int32_t>(words);
    last[n] = -1;
  }
}

// One block per (i, j), i < j, same class: suppress[i][j] = suppress[j][i] = IoU > threshold.
__global__ void pairwise_kernel(const uint32_t* __restrict__ bits, const unsigned long long* __restrict__ area,
                                const int32_t* __restrict__ first, const int32_t* __restrict__ last,
                                const int32_t* __restrict__ classes, int64_t count, int64_t words,
                                double iou_threshold, uint8_t* __restrict__ suppress) {
  const int64_t i = blockIdx.y;
  const int64_t j = blockIdx.x;
  if (j <= i || classes[i] != classes[j]) return;
  const int32_t lo = max(first[i], first[j]);
  const int32_t hi = min(last[i], last[j]);
  __shared__ unsigned long long partial[kThreads];
  unsigned long long inter = 0;
  const uint32_t* a = bits + i * words;
  const uint32_t* b = bits + j * words;
  for (int64_t w = lo + static_cast<int64_t>(threadIdx.x); w <= hi; w += blockDim.x) inter += __popc(a[w] & b[w]);
  partial[threadIdx.x] = inter;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const unsigned long long total = partial[0];
    const unsigned long long uni = area[i] + area[j] - total;
    const double iou = uni ? static_cast<double>(total) / static_cast<double>(uni) : 0.0;
    const uint8_t s = iou > iou_threshold;
    suppress[i * count + j] = s;
    suppress[j * count + i] = s;
  }
}

// A single block: stable rank by score (descending, ties by index), then the greedy pass over the kept list.
__global__ void greedy_kernel(const double* __restrict__ scores, const uint8_t* __restrict__ suppress, int64_t count,
                              int32_t* __restrict__ order, int32_t* __restrict__ kept, int32_t* __restrict__ kept_count,
                              uint8_t* __restrict__ keep) {
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const double s = scores[i];
    int64_t rank = 0;
    for (int64_t j = 0; j < count; ++j) {
      const double t = scores[j];
      rank += (t > s) || (t == s && j < i);
    }
    order[rank] = static_cast<int32_t>(i);
    keep[i] = 0;
  }
  __shared__ int32_t kept_so_far;
  if (threadIdx.x == 0) kept_so_far = 0;
  __syncthreads();
  for (int64_t r = 0; r < count; ++r) {
    const int64_t i = order[r];
    const int32_t k_count = kept_so_far;
    const uint8_t* row = suppress + i * count;
    int hit = 0;
    for (int32_t k = threadIdx.x; k < k_count; k += blockDim.x) hit |= row[kept[k]];
    hit = __syncthreads_or(hit);  // also orders the read of kept_so_far before thread 0's update
    if (threadIdx.x == 0 && !hit) {
      keep[i] = 1;
      kept[k_count] = static_cast<int32_t>(i);
      kept_so_far = k_count + 1;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) *kept_count = kept_so_far;
}

__global__ void raster_kernel(const uint32_t* __restrict__ bits, const int32_t* __restrict__ first,
                              const int32_t* __restrict__ last, const int32_t* __restrict__ classes,
                              const int32_t* __restrict__ kept, const int32_t* __restrict__ kept_count,
                              int64_t pixels, int64_t words, int32_t background, int32_t* __restrict__ label_map,
                              int32_t* __restrict__ owner) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= pixels) return;
  const int32_t w = static_cast<int32_t>(p / 32);
  const uint32_t bit = 1u << (p % 32);
  const int32_t k_count = *kept_count;
  int32_t label = background, who = -1;
  for (int32_t k = 0; k < k_count; ++k) {
    const int32_t n = kept[k];
    if (w < first[n] || w > last[n]) continue;
    if (bits[static_cast<int64_t>(n) * words + w] & bit) {
      label = classes[n];
      who = n;
      break;
    }
  }
  label_map[p] = label;
  owner[p] = who;
}

inline unsigned blocks_for(int64_t items) { return static_cast<unsigned>((items + kThreads - 1) / kThreads); }

}  // namespace

void mask_nms_raster_cuda(const uint8_t* masks, int64_t count, int64_t height, int64_t width, const int32_t* classes,
                          const double* scores, double iou_threshold, int32_t background, uint8_t* keep,
                          int32_t* label_map, int32_t* owner, std::uintptr_t stream_handle) {
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t pixels = height * width;
  const int64_t words = (pixels + 31) / 32;
  if (count > 65535) throw std::invalid_argument("mask_nms_raster (CUDA): at most 65535 masks per call");
  if (words > 2147483647) throw std::invalid_argument("mask_nms_raster (CUDA): image too large");

  StreamScratch scratch(stream);
  const size_t bits_at = scratch.reserve(static_cast<size_t>(count * words) * sizeof(uint32_t));
  const size_t area_at = scratch.reserve(static_cast<size_t>(count) * sizeof(unsigned long long));
  const size_t first_at = scratch.reserve(static_cast<size_t>(count) * sizeof(int32_t));
  const size_t last_at = scratch.reserve(static_cast<size_t>(count) * sizeof(int32_t));
  const size_t suppress_at = scratch.reserve(static_cast<size_t>(count * count));
  const size_t order_at = scratch.reserve(static_cast<size_t>(count) * sizeof(int32_t));
  const size_t kept_at = scratch.reserve(static_cast<size_t>(count) * sizeof(int32_t));
  const size_t kept_count_at = scratch.reserve(sizeof(int32_t));
  scratch.allocate();
  uint32_t* bits = scratch.at<uint32_t>(bits_at);
  auto* area = scratch.at<unsigned long long>(area_at);
  int32_t* first = scratch.at<int32_t>(first_at);
  int32_t* last = scratch.at<int32_t>(last_at);
  uint8_t* suppress = scratch.at<uint8_t>(suppress_at);
  int32_t* order = scratch.at<int32_t>(order_at);
  int32_t* kept = scratch.at<int32_t>(kept_at);
  int32_t* kept_count = scratch.at<int32_t>(kept_count_at);

  MODUSEG_CUDA_CHECK(cudaMemsetAsync(kept_count, 0, sizeof(int32_t), stream));
  if (count > 0) {
    MODUSEG_CUDA_CHECK(cudaMemsetAsync(area, 0, static_cast<size_t>(count) * sizeof(unsigned long long), stream));
    // Other-class pairs never suppress; every same-class pair (i != j) is written by pairwise_kernel, disjoint ones
    // included (IoU 0, suppressed iff 0 > threshold).
    MODUSEG_CUDA_CHECK(cudaMemsetAsync(suppress, 0, static_cast<size_t>(count * count), stream));
    init_ranges_kernel<<<blocks_for(count), kThreads, 0, stream>>>(count, words, first, last);
    MODUSEG_CUDA_CHECK(cudaGetLastError());
    pack_kernel<<<dim3(blocks_for(words * 32), static_cast<unsigned>(count)), kThreads, 0, stream>>>(
        masks, pixels, words, bits, area, first, last);
    MODUSEG_CUDA_CHECK(cudaGetLastError());
    pairwise_kernel<<<dim3(static_cast<unsigned>(count), static_cast<unsigned>(count)), kThreads, 0, stream>>>(
        bits, area, first, last, classes, count, words, iou_threshold, suppress);
    MODUSEG_CUDA_CHECK(cudaGetLastError());
    greedy_kernel<<<1, 1024, 0, stream>>>(scores, suppress, count, order, kept, kept_count, keep);
    MODUSEG_CUDA_CHECK(cudaGetLastError());
  }
  if (pixels > 0) {
    raster_kernel<<<blocks_for(pixels), kThreads, 0, stream>>>(bits, first, last, classes, kept, kept_count, pixels,
                                                               words, background, label_map, owner);
    MODUSEG_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace moduseg
