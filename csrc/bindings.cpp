// pybind11 module engine._C: entry points of the batched ops for both devices, the CPU-only region merging and top-k
// selection, and what the build holds (build_info). The batched ops take raw addresses: engine/ops.py validates the
// arrays (NumPy on the host, torch or CuPy on a CUDA device through __cuda_array_interface__), allocates the outputs
// with the caller's library and passes its CUDA stream; device -1 runs the CPU launcher with the GIL released.
// Nothing here links against torch.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "mask_nms/mask_nms.h"
#include "merge_regions/merge_regions.h"
#include "rac_merge/rac_merge.h"
#include "slic/slic.h"
#include "smfa/smfa.h"
#include "topk/topk.h"
#include "vote/vote.h"

#ifdef MODUSEG_WITH_CUDA
#include <cuda_runtime.h>

#include <atomic>
namespace moduseg {
std::atomic<int64_t>& cuda_launch_counter();
}
#endif

namespace py = pybind11;

namespace {

template <typename T>
using CArray = py::array_t<T, py::array::c_style>;
using Addresses = std::vector<uintptr_t>;

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

template <typename T>
T* at(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// One slot per image from the per-image addresses and the (B, 4) shapes: height, width, regions, atoms.
std::vector<moduseg::ImageSlot> image_slots(const Addresses& atoms, const Addresses& members,
                                            const CArray<int64_t>& shapes) {
  const auto num_images = static_cast<int64_t>(atoms.size());
  require(static_cast<int64_t>(members.size()) == num_images, "one members address per image");
  require(shapes.ndim() == 2 && shapes.shape(0) == num_images && shapes.shape(1) == 4, "shapes must be (B, 4)");
  std::vector<moduseg::ImageSlot> slots(static_cast<size_t>(num_images));
  for (int64_t b = 0; b < num_images; ++b) {
    moduseg::ImageSlot& s = slots[b];
    s.atoms = at<const int32_t>(atoms[b]);
    s.members = at<const uint8_t>(members[b]);
    s.height = shapes.at(b, 0);
    s.width = shapes.at(b, 1);
    s.count = shapes.at(b, 2);
    s.num_atoms = shapes.at(b, 3);
  }
  return slots;
}

void require_cuda_build(int device) {
#ifndef MODUSEG_WITH_CUDA
  if (device >= 0) throw std::invalid_argument("engine._C was built without CUDA: its ops take host arrays only");
#else
  (void)device;
#endif
}

void soft_mask_pool(int device, uintptr_t stream, const Addresses& features, const Addresses& atoms,
                    const Addresses& members, const CArray<int64_t>& shapes, uintptr_t out, int64_t dim,
                    int64_t stride, bool hard, double eps, bool normalize, const std::vector<int64_t>& groups,
                    int num_threads) {
  require_cuda_build(device);
  require(stride > 0 && dim >= 0, "stride must be positive");
  require(features.size() == atoms.size(), "one features address per image");
  require(groups.size() <= static_cast<size_t>(moduseg::kMaxGroups), "at most 16 feature groups");
  std::vector<moduseg::ImageSlot> slots = image_slots(atoms, members, shapes);
  for (size_t b = 0; b < slots.size(); ++b) {
    slots[b].features = at<const float>(features[b]);
    slots[b].grid_h = (slots[b].height + stride - 1) / stride;
    slots[b].grid_w = (slots[b].width + stride - 1) / stride;
  }
  moduseg::SmfaArgs args;
  args.dim = dim;
  args.stride = stride;
  args.hard = hard;
  args.eps = eps;
  args.normalize = normalize;
  args.num_groups = static_cast<int64_t>(groups.size());
  std::copy(groups.begin(), groups.end(), args.groups);
  args.capacity = hard ? 1 : static_cast<int32_t>(stride * stride);
  py::gil_scoped_release release;
#ifdef MODUSEG_WITH_CUDA
  if (device >= 0)
    return moduseg::soft_mask_pool_cuda(slots.data(), static_cast<int64_t>(slots.size()), args, at<float>(out),
                                        device, at<void>(stream));
#endif
  (void)stream;
  moduseg::soft_mask_pool_cpu(slots.data(), static_cast<int64_t>(slots.size()), args, at<float>(out), num_threads);
}

void mask_nms_raster(int device, uintptr_t stream, const Addresses& atoms, const Addresses& members,
                     const Addresses& label_maps, const Addresses& owners, const CArray<int64_t>& shapes,
                     uintptr_t classes, uintptr_t scores, uintptr_t ids, uintptr_t keep, double iou_threshold,
                     int32_t background, std::optional<int32_t> drop_class, int num_threads) {
  require_cuda_build(device);
  require(label_maps.size() == atoms.size() && owners.size() == atoms.size(), "one output address per image");
  std::vector<moduseg::ImageSlot> slots = image_slots(atoms, members, shapes);
  for (size_t b = 0; b < slots.size(); ++b) {
    slots[b].label_map = at<int32_t>(label_maps[b]);
    slots[b].owner = at<int32_t>(owners[b]);
  }
  moduseg::NmsArgs args;
  args.classes = at<const int32_t>(classes);
  args.scores = at<const double>(scores);
  args.ids = at<const int32_t>(ids);
  args.keep = at<uint8_t>(keep);
  args.iou_threshold = iou_threshold;
  args.background = background;
  args.has_drop_class = drop_class.has_value();
  args.drop_class = drop_class.value_or(0);
  py::gil_scoped_release release;
#ifdef MODUSEG_WITH_CUDA
  if (device >= 0)
    return moduseg::mask_nms_raster_cuda(slots.data(), static_cast<int64_t>(slots.size()), args, device,
                                         at<void>(stream));
#endif
  (void)stream;
  moduseg::mask_nms_raster_cpu(slots.data(), static_cast<int64_t>(slots.size()), args, num_threads);
}

void vote(int device, uintptr_t stream, uintptr_t similarities, uintptr_t labels, int64_t queries, int64_t k,
          uintptr_t class_counts, int64_t num_classes, int32_t method, double temperature, uintptr_t winner,
          uintptr_t confidence, uintptr_t shares, int num_threads) {
  require_cuda_build(device);
  require(method >= moduseg::kVoteCount && method <= moduseg::kVoteSoftmax, "unknown vote method");
  require(std::isfinite(temperature) && temperature > 0.0, "the vote's temperature must be a finite number > 0");
  moduseg::VoteArgs args;
  args.similarities = at<const float>(similarities);
  args.labels = at<const int64_t>(labels);
  args.class_counts = at<const int64_t>(class_counts);
  args.queries = queries;
  args.k = k;
  args.num_classes = num_classes;
  args.method = method;
  args.temperature = temperature;
  args.winner = at<int32_t>(winner);
  args.confidence = at<float>(confidence);
  args.shares = at<float>(shares);  // 0: no shares
  py::gil_scoped_release release;
#ifdef MODUSEG_WITH_CUDA
  if (device >= 0) return moduseg::vote_cuda(args, device, at<void>(stream));
#endif
  (void)stream;
  moduseg::vote_cpu(args, num_threads);
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

py::tuple top_k(const CArray<float>& scores, const std::optional<CArray<float>>& offsets, int64_t k,
                int num_threads) {
  require(scores.ndim() == 2, "scores must be (rows, columns)");
  require(k >= 0 && k <= scores.shape(1), "k must lie in [0, columns]");
  require(!offsets || (offsets->ndim() == 1 && offsets->shape(0) == scores.shape(1)), "offsets must be (columns,)");
  CArray<float> values({scores.shape(0), static_cast<py::ssize_t>(k)});
  CArray<int64_t> ids({scores.shape(0), static_cast<py::ssize_t>(k)});
  moduseg::TopKArgs args;
  args.scores = scores.data();
  args.offsets = offsets ? offsets->data() : nullptr;
  args.rows = scores.shape(0);
  args.columns = scores.shape(1);
  args.k = k;
  args.values = values.mutable_data();
  args.ids = ids.mutable_data();
  if (k > 0) {
    py::gil_scoped_release release;
    moduseg::top_k_cpu(args, num_threads);
  }
  return py::make_tuple(values, ids);
}

void slic(int device, uintptr_t stream, const Addresses& labs, const Addresses& labels,
          const CArray<int64_t>& shapes, const CArray<double>& weights, int32_t iterations, int num_threads) {
  require_cuda_build(device);
  const auto num_images = static_cast<int64_t>(labs.size());
  require(static_cast<int64_t>(labels.size()) == num_images, "one labels address per image");
  require(shapes.ndim() == 2 && shapes.shape(0) == num_images && shapes.shape(1) == 5, "shapes must be (B, 5)");
  require(weights.ndim() == 1 && weights.shape(0) == num_images, "weights must be (B,)");
  require(iterations >= 0, "iterations must be >= 0");
  std::vector<moduseg::SlicSlot> slots(static_cast<size_t>(num_images));
  for (int64_t b = 0; b < num_images; ++b) {
    moduseg::SlicSlot& slot = slots[b];
    slot.lab = at<const float>(labs[b]);
    slot.labels = at<int32_t>(labels[b]);
    slot.height = shapes.at(b, 0);
    slot.width = shapes.at(b, 1);
    slot.grid_h = shapes.at(b, 2);
    slot.grid_w = shapes.at(b, 3);
    slot.min_size = shapes.at(b, 4);
    slot.weight = weights.at(b);
    require(slot.height > 0 && slot.width > 0 && slot.height * slot.width < (int64_t{1} << 31), "image size");
    require(slot.grid_h >= 1 && slot.grid_h <= slot.height && slot.grid_w >= 1 && slot.grid_w <= slot.width,
            "the grid must have 1..H rows and 1..W columns");
  }
  py::gil_scoped_release release;
#ifdef MODUSEG_WITH_CUDA
  if (device >= 0) return moduseg::slic_cuda(slots.data(), num_images, iterations, device, at<void>(stream));
#endif
  (void)stream;
  moduseg::slic_cpu(slots.data(), num_images, iterations, num_threads);
}

void rac_merge(int device, uintptr_t stream, const Addresses& edges, const Addresses& areas,
               const Addresses& features, const Addresses& colours, const CArray<int64_t>& sizes, int64_t dim,
               int64_t channels, const std::vector<int64_t>& levels, double colour_weight, double size_weight,
               uintptr_t parent, uintptr_t height, uintptr_t area, uintptr_t coherence, uintptr_t snapshots,
               uintptr_t num_nodes, int num_threads) {
  require_cuda_build(device);
  const auto num_images = static_cast<int64_t>(edges.size());
  require(static_cast<int64_t>(areas.size()) == num_images && static_cast<int64_t>(features.size()) == num_images &&
              static_cast<int64_t>(colours.size()) == num_images,
          "one address of each input per image");
  require(sizes.ndim() == 2 && sizes.shape(0) == num_images && sizes.shape(1) == 2, "sizes must be (B, 2)");
  require(levels.size() <= static_cast<size_t>(moduseg::kMaxLevels), "at most 16 levels");
  std::vector<moduseg::MergeSlot> slots(static_cast<size_t>(num_images));
  for (int64_t b = 0; b < num_images; ++b) {
    slots[b].edges = at<const int64_t>(edges[b]);
    slots[b].leaf_area = at<const double>(areas[b]);
    slots[b].leaf_features = at<const float>(features[b]);
    slots[b].leaf_colour = at<const float>(colours[b]);
    slots[b].num_edges = sizes.at(b, 0);
    slots[b].count = sizes.at(b, 1);
  }
  moduseg::MergeArgs args;
  args.dim = dim;
  args.channels = channels;
  args.num_levels = static_cast<int64_t>(levels.size());
  std::copy(levels.begin(), levels.end(), args.levels);
  args.colour_weight = colour_weight;
  args.size_weight = size_weight;
  args.parent = at<int64_t>(parent);
  args.height = at<double>(height);
  args.area = at<double>(area);
  args.coherence = at<double>(coherence);
  args.snapshots = at<int32_t>(snapshots);
  args.num_nodes = at<int64_t>(num_nodes);
  py::gil_scoped_release release;
#ifdef MODUSEG_WITH_CUDA
  if (device >= 0) return moduseg::rac_merge_cuda(slots.data(), num_images, args, device, at<void>(stream));
#endif
  (void)stream;
  moduseg::rac_merge_cpu(slots.data(), num_images, args, num_threads);
}

// What this build holds: whether the CUDA launchers were compiled, for which GPU architectures, and the ops.
py::dict build_info() {
  py::dict info;
  py::list architectures;
#ifdef MODUSEG_WITH_CUDA
  std::string archs = MODUSEG_CUDA_ARCHITECTURES;  // CMake's list, comma-separated: "75-real,80-real,90"
  size_t start = 0;
  while (start <= archs.size()) {
    const size_t end = std::min(archs.find(',', start), archs.size());
    std::string arch = archs.substr(start, end - start);
    if (!arch.empty()) {
      const size_t dash = arch.find('-');
      const std::string number = arch.substr(0, dash), kind = dash == std::string::npos ? "" : arch.substr(dash + 1);
      if (kind != "virtual") architectures.append("sm_" + number);
      if (kind.empty() || kind == "virtual") architectures.append("compute_" + number);  // PTX, for newer GPUs
    }
    start = end + 1;
  }
  info["cuda"] = true;
  info["cuda_runtime"] = CUDART_VERSION;
#else
  info["cuda"] = false;
  info["cuda_runtime"] = py::none();
#endif
  info["architectures"] = architectures;
  info["ops"] = py::make_tuple("soft_mask_pool", "mask_nms_raster", "vote", "slic", "rac_merge");
  info["cpu_ops"] =
      py::make_tuple("soft_mask_pool", "mask_nms_raster", "vote", "merge_regions", "slic", "rac_merge", "top_k");
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

int cuda_device_count() {
#ifdef MODUSEG_WITH_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no GPU: clear the error, report none
    return 0;
  }
  return count;
#else
  return 0;
#endif
}

int64_t cuda_launches() {
#ifdef MODUSEG_WITH_CUDA
  return moduseg::cuda_launch_counter().load();
#else
  return 0;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ModuSeg compiled kernels, one body per op for the CPU (OpenMP) and CUDA launchers: batched soft-mask "
            "pooling (SMFA), class-specific mask NMS + confidence-priority rasterisation, the retrieval vote, "
            "SLIC superpixels, merging in rounds of mutual nearest pairs; and the embedded proposer's greedy region "
            "merging (CPU). engine/ops.py is their Python face.";
  m.def("soft_mask_pool", &soft_mask_pool, py::arg("device"), py::arg("stream"), py::arg("features"),
        py::arg("atoms"), py::arg("members"), py::arg("shapes"), py::arg("out"), py::arg("dim"), py::arg("stride"),
        py::arg("hard"), py::arg("eps"), py::arg("normalize"), py::arg("groups"), py::arg("num_threads"));
  m.def("mask_nms_raster", &mask_nms_raster, py::arg("device"), py::arg("stream"), py::arg("atoms"),
        py::arg("members"), py::arg("label_maps"), py::arg("owners"), py::arg("shapes"), py::arg("classes"),
        py::arg("scores"), py::arg("ids"), py::arg("keep"), py::arg("iou_threshold"), py::arg("background"),
        py::arg("drop_class"), py::arg("num_threads"));
  m.def("vote", &vote, py::arg("device"), py::arg("stream"), py::arg("similarities"), py::arg("labels"),
        py::arg("queries"), py::arg("k"), py::arg("class_counts"), py::arg("num_classes"), py::arg("method"),
        py::arg("temperature"), py::arg("winner"), py::arg("confidence"), py::arg("shares"),
        py::arg("num_threads"));
  m.def("top_k", &top_k, py::arg("scores"), py::arg("offsets"), py::arg("k"), py::arg("num_threads"),
        "Exact top-k of each row (higher score first, equal scores lower column first, NaN last) -> (values, ids).");
  m.def("merge_regions", &merge_regions, py::arg("edges"), py::arg("area"), py::arg("features"), py::arg("colour"),
        py::arg("levels"), py::arg("colour_weight"), py::arg("size_weight"),
        "Agglomerative merging -> (parent, height, area, coherence, snapshots (L, n) int32, number of nodes).");
  m.def("slic", &slic, py::arg("device"), py::arg("stream"), py::arg("labs"), py::arg("labels"), py::arg("shapes"),
        py::arg("weights"), py::arg("iterations"), py::arg("num_threads"),
        "SLIC superpixels of a batch of Lab images (shapes: H, W, grid rows, grid columns, min_size).");
  m.def("rac_merge", &rac_merge, py::arg("device"), py::arg("stream"), py::arg("edges"), py::arg("areas"),
        py::arg("features"), py::arg("colours"), py::arg("sizes"), py::arg("dim"), py::arg("channels"),
        py::arg("levels"), py::arg("colour_weight"), py::arg("size_weight"), py::arg("parent"), py::arg("height"),
        py::arg("area"), py::arg("coherence"), py::arg("snapshots"), py::arg("num_nodes"), py::arg("num_threads"),
        "Merging of adjacent regions in rounds of mutual nearest pairs, a batch of region graphs.");
  m.def("build_info", &build_info, "What this build holds: CUDA launchers and architectures, ops, OpenMP.");
  m.def("cuda_device_count", &cuda_device_count, "GPUs the CUDA runtime sees (0 without a driver or a CUDA build).");
  m.def("cuda_launches", &cuda_launches, "CUDA kernels launched by this process's ops so far.");
}
