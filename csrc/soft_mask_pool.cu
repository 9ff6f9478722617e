// CUDA soft-mask feature aggregation (SMFA): a block-count kernel (one CUDA block per mask and patch row, shared-memory
// counters per patch column) and a pooling kernel (one CUDA block per mask: weighted mean over the patches in float64,
// then the L2 normalisation as a block reduction).
#include <cuda_runtime.h>

#include <cmath>

#include "cuda_check.cuh"
#include "kernels.h"

namespace moduseg {

namespace {

constexpr int kThreads = 256;

__global__ void count_blocks_kernel(const uint8_t* __restrict__ masks, int64_t height, int64_t width, int64_t stride,
                                    int64_t grid_h, int64_t grid_w, int32_t* __restrict__ counts) {
  extern __shared__ int32_t column_counts[];  // grid_w counters
  const int64_t n = blockIdx.x;
  const int64_t by = blockIdx.y;
  for (int64_t bx = threadIdx.x; bx < grid_w; bx += blockDim.x) column_counts[bx] = 0;
  __syncthreads();
  const int64_t y0 = by * stride;
  const int64_t y1 = min(height, y0 + stride);
  const uint8_t* mask = masks + n * height * width;
  const int64_t span = (y1 - y0) * width;
  for (int64_t k = threadIdx.x; k < span; k += blockDim.x) {
    const int64_t y = y0 + k / width;
    const int64_t x = k % width;
    if (mask[y * width + x]) atomicAdd(&column_counts[x / stride], 1);
  }
  __syncthreads();
  int32_t* out = counts + (n * grid_h + by) * grid_w;
  for (int64_t bx = threadIdx.x; bx < grid_w; bx += blockDim.x) out[bx] = column_counts[bx];
}

__global__ void pool_kernel(const float* __restrict__ features, const int32_t* __restrict__ counts, int64_t patches,
                            int64_t dim, double block_area, double eps, bool normalize, float* __restrict__ out) {
  extern __shared__ double shared[];  // dim pooled values, then blockDim partial sums
  double* pooled = shared;
  double* partial = shared + dim;
  const int64_t n = blockIdx.x;
  const int32_t* c = counts + n * patches;
  double sq = 0.0;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    double acc = 0.0, weight_sum = 0.0;
    for (int64_t p = 0; p < patches; ++p) {
      const int32_t covered = c[p];  // the same for every thread: no divergence
      if (covered == 0) continue;
      const double w = static_cast<double>(covered) / block_area;
      weight_sum += w;
      acc += w * static_cast<double>(features[p * dim + d]);
    }
    const double v = acc / (weight_sum + eps);
    pooled[d] = v;
    sq += v * v;
  }
  partial[threadIdx.x] = sq;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  const double norm = normalize ? fmax(sqrt(partial[0]), 1e-12) : 1.0;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) out[n * dim + d] = static_cast<float>(pooled[d] / norm);
}

}  // namespace

void soft_mask_pool_cuda(const float* features, int64_t grid_h, int64_t grid_w, int64_t dim, const uint8_t* masks,
                         int64_t count, int64_t height, int64_t width, int64_t stride, double eps, bool normalize,
                         float* out, std::uintptr_t stream_handle) {
  if (count == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t patches = grid_h * grid_w;
  if (grid_h > 65535) throw std::invalid_argument("soft_mask_pool (CUDA): at most 65535 patch rows");

  const size_t count_shared = static_cast<size_t>(grid_w) * sizeof(int32_t);
  const size_t pool_shared = static_cast<size_t>(dim + kThreads) * sizeof(double);
  int device = 0, max_optin = 0;
  MODUSEG_CUDA_CHECK(cudaGetDevice(&device));
  MODUSEG_CUDA_CHECK(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (count_shared > static_cast<size_t>(max_optin) || pool_shared > static_cast<size_t>(max_optin))
    throw std::invalid_argument("soft_mask_pool (CUDA): feature dimension or grid width too large for shared memory");
  if (count_shared > 48 * 1024)
    MODUSEG_CUDA_CHECK(cudaFuncSetAttribute(count_blocks_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(count_shared)));
  if (pool_shared > 48 * 1024)
    MODUSEG_CUDA_CHECK(cudaFuncSetAttribute(pool_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(pool_shared)));

  StreamScratch scratch(stream);
  const size_t counts_at = scratch.reserve(static_cast<size_t>(count * patches) * sizeof(int32_t));
  scratch.allocate();
  int32_t* counts = scratch.at<int32_t>(counts_at);

  count_blocks_kernel<<<dim3(static_cast<unsigned>(count), static_cast<unsigned>(grid_h)), kThreads, count_shared,
                        stream>>>(masks, height, width, stride, grid_h, grid_w, counts);
  MODUSEG_CUDA_CHECK(cudaGetLastError());
  pool_kernel<<<static_cast<unsigned>(count), kThreads, pool_shared, stream>>>(
      features, counts, patches, dim, static_cast<double>(stride * stride), eps, normalize, out);
  MODUSEG_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moduseg
