// Declarations of the compiled ops shared by the bindings, the CPU (OpenMP) sources and the CUDA sources.
// Every op has a NumPy twin in engine/reference.py that defines its result; engine/ops.py validates the inputs, so
// these functions trust shapes, dtypes and contiguity.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moduseg {

// SMFA: out[n] = L2normalise(sum_p w_np F_p / (sum_p w_np + eps)), w_np = fraction of patch p's stride x stride
// pixels covered by mask n (zero padding beyond height, width). masks: n x height x width bytes, nonzero = covered.
// features: grid_h x grid_w x dim float32 with grid_h = ceil(height / stride), grid_w = ceil(width / stride).
void soft_mask_pool_cpu(const float* features, int64_t grid_h, int64_t grid_w, int64_t dim, const uint8_t* masks,
                        int64_t count, int64_t height, int64_t width, int64_t stride, double eps, bool normalize,
                        float* out, int num_threads);

// Class-specific greedy mask NMS (IoU > iou_threshold with a kept mask of the same class suppresses; order: score
// descending, ties by index) and confidence-priority rasterisation (a pixel keeps the first kept mask that covers it).
// keep: count bytes (0/1); label_map, owner: height x width int32.
void mask_nms_raster_cpu(const uint8_t* masks, int64_t count, int64_t height, int64_t width, const int32_t* classes,
                         const double* scores, double iou_threshold, int32_t background, uint8_t* keep,
                         int32_t* label_map, int32_t* owner, int num_threads);

#ifdef MODUSEG_WITH_CUDA
// The same ops on device pointers, enqueued on `stream` (a cudaStream_t given as an integer; 0 = legacy default).
// Inputs and outputs are device memory; scratch is allocated stream-ordered and released before returning.
void soft_mask_pool_cuda(const float* features, int64_t grid_h, int64_t grid_w, int64_t dim, const uint8_t* masks,
                         int64_t count, int64_t height, int64_t width, int64_t stride, double eps, bool normalize,
                         float* out, std::uintptr_t stream);

void mask_nms_raster_cuda(const uint8_t* masks, int64_t count, int64_t height, int64_t width, const int32_t* classes,
                          const double* scores, double iou_threshold, int32_t background, uint8_t* keep,
                          int32_t* label_map, int32_t* owner, std::uintptr_t stream);

int cuda_device_count();
#endif

}  // namespace moduseg
