// pybind11 module engine._C: NumPy entry points for the CPU kernels (the GIL is released while they run).
// engine/ops.py validates everything; the checks here only guard against misuse.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
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

void check_regions(const CArray<int32_t>& atoms, const CArray<uint8_t>& members) {
  require(atoms.ndim() == 2, "atoms must be (H, W)");
  require(members.ndim() == 2, "members must be (N, A)");
}

CArray<float> soft_mask_pool(const CArray<float>& features, const CArray<int32_t>& atoms,
                             const CArray<uint8_t>& members, int64_t stride, bool hard, double eps, bool normalize,
                             const CArray<int64_t>& groups, int num_threads) {
  check_regions(atoms, members);
  require(features.ndim() == 3, "features must be (h, w, D)");
  require(stride > 0, "stride must be positive");
  const int64_t grid_h = features.shape(0), grid_w = features.shape(1), dim = features.shape(2);
  const int64_t height = atoms.shape(0), width = atoms.shape(1);
  const int64_t count = members.shape(0), num_atoms = members.shape(1);
  require(grid_h == (height + stride - 1) / stride && grid_w == (width + stride - 1) / stride,
          "features grid does not match ceil(H / stride) x ceil(W / stride)");
  require(groups.ndim() == 1, "groups must be (G,)");
  int64_t grouped = 0;
  for (int64_t g = 0; g < groups.shape(0); ++g) grouped += groups.data()[g];
  require(groups.shape(0) == 0 || grouped == dim, "group widths must sum to the feature width");
  CArray<float> out({count, dim});
  const int64_t* widths = groups.data();
  const float* f = features.data();
  const int32_t* a = atoms.data();
  const uint8_t* m = members.data();
  float* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    moduseg::soft_mask_pool_cpu(f, grid_h, grid_w, dim, a, height, width, num_atoms, m, count, stride, hard, eps,
                                normalize, widths, groups.shape(0), o, num_threads);
  }
  return out;
}

py::tuple mask_nms_raster(const CArray<int32_t>& atoms, const CArray<uint8_t>& members,
                          const CArray<int32_t>& classes, const CArray<double>& scores, double iou_threshold,
                          int32_t background, int num_threads) {
  check_regions(atoms, members);
  const int64_t height = atoms.shape(0), width = atoms.shape(1);
  const int64_t count = members.shape(0), num_atoms = members.shape(1);
  require(classes.ndim() == 1 && classes.shape(0) == count, "classes must be (N,)");
  require(scores.ndim() == 1 && scores.shape(0) == count, "scores must be (N,)");
  py::array_t<bool> keep(count);
  CArray<int32_t> label_map({height, width});
  CArray<int32_t> owner({height, width});
  const int32_t* a = atoms.data();
  const uint8_t* m = members.data();
  const int32_t* c = classes.data();
  const double* s = scores.data();
  auto* k = reinterpret_cast<uint8_t*>(keep.mutable_data());
  int32_t* l = label_map.mutable_data();
  int32_t* o = owner.mutable_data();
  {
    py::gil_scoped_release release;
    moduseg::mask_nms_raster_cpu(a, height, width, num_atoms, m, count, c, s, iou_threshold, background, k, l, o,
                                 num_threads);
  }
  return py::make_tuple(keep, label_map, owner);
}

py::tuple merge_regions(const CArray<int64_t>& edges, const CArray<double>& area, const CArray<float>& features,
                        const CArray<float>& colour, const CArray<int64_t>& levels, double colour_weight,
                        double size_weight) {
  require(edges.ndim() == 2 && edges.shape(1) == 2, "edges must be (E, 2)");
  require(area.ndim() == 1 && features.ndim() == 2 && colour.ndim() == 2 && levels.ndim() == 1,
          "area (n,), features (n, D), colour (n, C), levels (L,)");
  const int64_t count = area.shape(0);
  require(features.shape(0) == count && colour.shape(0) == count, "features and colour need one row per leaf");
  const int64_t capacity = std::max<int64_t>(2 * count - 1, 1);
  CArray<int64_t> parent(capacity);
  CArray<double> height(capacity), node_area(capacity), coherence(capacity);
  CArray<int32_t> snapshots({levels.shape(0), count});
  int64_t nodes = 0;
  const int64_t* e = edges.data();
  const double* a = area.data();
  const float* f = features.data();
  const float* c = colour.data();
  const int64_t* l = levels.data();
  int64_t* p = parent.mutable_data();
  double* h = height.mutable_data();
  double* na = node_area.mutable_data();
  double* co = coherence.mutable_data();
  int32_t* s = snapshots.mutable_data();
  {
    py::gil_scoped_release release;
    moduseg::merge_regions_cpu(e, edges.shape(0), a, f, features.shape(1), c, colour.shape(1), count, l,
                               levels.shape(0), colour_weight, size_weight, p, h, na, co, s, &nodes);
  }
  return py::make_tuple(parent, height, node_area, coherence, snapshots, nodes);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ModuSeg compiled kernels over regions made of atoms: soft-mask pooling (SMFA) and class-specific mask "
            "NMS + confidence-priority rasterisation";
  m.def("soft_mask_pool", &soft_mask_pool, py::arg("features"), py::arg("atoms"), py::arg("members"),
        py::arg("stride"), py::arg("hard"), py::arg("eps"), py::arg("normalize"), py::arg("groups"),
        py::arg("num_threads"),
        "SMFA. features (h, w, D) float32, atoms (H, W) int32, members (N, A) uint8 -> (N, D) float32.");
  m.def("mask_nms_raster", &mask_nms_raster, py::arg("atoms"), py::arg("members"), py::arg("classes"),
        py::arg("scores"), py::arg("iou_threshold"), py::arg("background"), py::arg("num_threads"),
        "Class-specific mask NMS + rasterisation -> (keep bool (N,), label_map int32, owner int32).");
  m.def("merge_regions", &merge_regions, py::arg("edges"), py::arg("area"), py::arg("features"), py::arg("colour"),
        py::arg("levels"), py::arg("colour_weight"), py::arg("size_weight"),
        "Agglomerative merging -> (parent, height, area, coherence, snapshots (L, n) int32, number of nodes).");
}
