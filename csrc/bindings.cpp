// pybind11 module engine._C: NumPy entry points for the CPU kernels (the GIL is released while they run) and raw
// device-pointer entry points for the CUDA kernels (engine/ops.py allocates the torch tensors and passes data_ptr()
// and the current stream). engine/ops.py validates everything; the checks here only guard against misuse.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace py = pybind11;

namespace {

template <typename T>
using CArray = py::array_t<T, py::array::c_style>;

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

CArray<float> soft_mask_pool(const CArray<float>& features, const CArray<uint8_t>& masks, int64_t stride, double eps,
                             bool normalize, int num_threads) {
  require(features.ndim() == 3, "features must be (h, w, D)");
  require(masks.ndim() == 3, "masks must be (N, H, W)");
  require(stride > 0, "stride must be positive");
  const int64_t grid_h = features.shape(0), grid_w = features.shape(1), dim = features.shape(2);
  const int64_t count = masks.shape(0), height = masks.shape(1), width = masks.shape(2);
  require(grid_h == (height + stride - 1) / stride && grid_w == (width + stride - 1) / stride,
          "features grid does not match ceil(H / stride) x ceil(W / stride)");
  CArray<float> out({count, dim});
  const float* f = features.data();
  const uint8_t* m = masks.data();
  float* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    moduseg::soft_mask_pool_cpu(f, grid_h, grid_w, dim, m, count, height, width, stride, eps, normalize, o,
                                num_threads);
  }
  return out;
}

py::tuple mask_nms_raster(const CArray<uint8_t>& masks, const CArray<int32_t>& classes, const CArray<double>& scores,
                          double iou_threshold, int32_t background, int num_threads) {
  require(masks.ndim() == 3, "masks must be (N, H, W)");
  const int64_t count = masks.shape(0), height = masks.shape(1), width = masks.shape(2);
  require(classes.ndim() == 1 && classes.shape(0) == count, "classes must be (N,)");
  require(scores.ndim() == 1 && scores.shape(0) == count, "scores must be (N,)");
  py::array_t<bool> keep(count);
  CArray<int32_t> label_map({height, width});
  CArray<int32_t> owner({height, width});
  const uint8_t* m = masks.data();
  const int32_t* c = classes.data();
  const double* s = scores.data();
  auto* k = reinterpret_cast<uint8_t*>(keep.mutable_data());
  int32_t* l = label_map.mutable_data();
  int32_t* o = owner.mutable_data();
  {
    py::gil_scoped_release release;
    moduseg::mask_nms_raster_cpu(m, count, height, width, c, s, iou_threshold, background, k, l, o, num_threads);
  }
  return py::make_tuple(keep, label_map, owner);
}

#ifdef MODUSEG_WITH_CUDA
template <typename T>
T* device_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ModuSeg compiled kernels: fused soft-mask pooling and batched mask NMS + rasterisation (CPU/CUDA)";

  m.def("has_cuda", []() {
#ifdef MODUSEG_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build contains the CUDA kernels.");

  m.def("cuda_device_count", []() {
#ifdef MODUSEG_WITH_CUDA
    return moduseg::cuda_device_count();
#else
    return 0;
#endif
  }, "Number of usable CUDA devices (0 without a driver, a GPU or a CUDA build).");

  m.def("soft_mask_pool", &soft_mask_pool, py::arg("features"), py::arg("masks"), py::arg("stride"),
        py::arg("eps"), py::arg("normalize"), py::arg("num_threads"),
        "CPU SMFA. features (h, w, D) float32, masks (N, H, W) uint8 -> (N, D) float32.");
  m.def("mask_nms_raster", &mask_nms_raster, py::arg("masks"), py::arg("classes"), py::arg("scores"),
        py::arg("iou_threshold"), py::arg("background"), py::arg("num_threads"),
        "CPU class-specific mask NMS + rasterisation -> (keep bool (N,), label_map int32, owner int32).");

#ifdef MODUSEG_WITH_CUDA
  m.def("soft_mask_pool_cuda",
        [](std::uintptr_t features, int64_t grid_h, int64_t grid_w, int64_t dim, std::uintptr_t masks, int64_t count,
           int64_t height, int64_t width, int64_t stride, double eps, bool normalize, std::uintptr_t out,
           std::uintptr_t stream) {
          py::gil_scoped_release release;
          moduseg::soft_mask_pool_cuda(device_ptr<const float>(features), grid_h, grid_w, dim,
                                       device_ptr<const uint8_t>(masks), count, height, width, stride, eps,
                                       normalize, device_ptr<float>(out), stream);
        },
        py::arg("features"), py::arg("grid_h"), py::arg("grid_w"), py::arg("dim"), py::arg("masks"),
        py::arg("count"), py::arg("height"), py::arg("width"), py::arg("stride"), py::arg("eps"),
        py::arg("normalize"), py::arg("out"), py::arg("stream"),
        "CUDA SMFA on device pointers, enqueued on `stream`.");
  m.def("mask_nms_raster_cuda",
        [](std::uintptr_t masks, int64_t count, int64_t height, int64_t width, std::uintptr_t classes,
           std::uintptr_t scores, double iou_threshold, int32_t background, std::uintptr_t keep,
           std::uintptr_t label_map, std::uintptr_t owner, std::uintptr_t stream) {
          py::gil_scoped_release release;
          moduseg::mask_nms_raster_cuda(device_ptr<const uint8_t>(masks), count, height, width,
                                        device_ptr<const int32_t>(classes), device_ptr<const double>(scores),
                                        iou_threshold, background, device_ptr<uint8_t>(keep),
                                        device_ptr<int32_t>(label_map), device_ptr<int32_t>(owner), stream);
        },
        py::arg("masks"), py::arg("count"), py::arg("height"), py::arg("width"), py::arg("classes"),
        py::arg("scores"), py::arg("iou_threshold"), py::arg("background"), py::arg("keep"), py::arg("label_map"),
        py::arg("owner"), py::arg("stream"),
        "CUDA mask NMS + rasterisation on device pointers, enqueued on `stream`.");
#endif
}
