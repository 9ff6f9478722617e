// What the CPU (OpenMP) and CUDA launchers share: the qualifier that compiles a body for both devices, the per-image
// table a batched op reads, and the few primitives whose spelling differs by device (atomic add, lowest set bit).
//
// An op's body is written once as HOST_DEVICE_INLINE functions in its header (smfa/smfa.h, mask_nms/mask_nms.h,
// vote/vote.h); op_cpu.cpp runs them in OpenMP loops and op_cuda.cu in CUDA kernels, so the CPU tests exercise the
// code the GPU runs (detectron2's csrc habit).
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef __CUDACC__
#define HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE_INLINE inline
#endif

namespace moduseg {

// One image of a batch as every batched op sees it: pointers into the caller's arrays (host or device) and offsets
// into the batch's concatenated per-region, per-atom, per-patch and per-word arrays, filled on the host by plan_batch.
// A pointer an op does not use may be null.
struct ImageSlot {
  const int32_t* atoms = nullptr;    // height x width atom ids in [0, num_atoms) (other ids are ignored)
  const uint8_t* members = nullptr;  // count x num_atoms, nonzero: the atom belongs to the region
  const float* features = nullptr;   // grid_h x grid_w x dim patch features (SMFA)
  int32_t* label_map = nullptr;      // height x width outputs (NMS + raster)
  int32_t* owner = nullptr;
  int64_t height = 0, width = 0, count = 0, num_atoms = 0, grid_h = 0, grid_w = 0;
  int64_t region_offset = 0;  // first region's row in per-region arrays (queries, classes, scores, keep, ids)
  int64_t atom_offset = 0;    // first atom's slot in per-atom scratch
  int64_t word_offset = 0;    // first 64-bit word of its regions' packed memberships
  int64_t patch_offset = 0;   // first patch's slot in per-patch scratch
  int64_t pixel_offset = 0;   // first pixel's index in a flat enumeration of the batch's pixels
};

// Totals of a planned batch (the sizes of the scratch arrays and of the flat index spaces the kernels run over).
struct BatchTotals {
  int64_t regions = 0, atoms = 0, words = 0, patches = 0, pixels = 0;
};

HOST_DEVICE_INLINE int64_t words_for(int64_t bits) { return (bits + 63) / 64; }

// Offsets of each image's slices in the batch's concatenated arrays; grid_h/grid_w must be set for per-patch slices.
inline BatchTotals plan_batch(ImageSlot* slots, int64_t num_images) {
  BatchTotals t;
  for (int64_t b = 0; b < num_images; ++b) {
    ImageSlot& s = slots[b];
    s.region_offset = t.regions;
    s.atom_offset = t.atoms;
    s.word_offset = t.words;
    s.patch_offset = t.patches;
    s.pixel_offset = t.pixels;
    t.regions += s.count;
    t.atoms += s.num_atoms;
    t.words += s.count * words_for(s.num_atoms);
    t.patches += s.grid_h * s.grid_w;
    t.pixels += s.height * s.width;
  }
  return t;
}

// The image whose slice [offset(b), offset(b + 1)) of a flat index space holds `index` (binary search over slots
// sorted by offset; images with empty slices are skipped). `Field` selects the offset.
template <typename Field>
HOST_DEVICE_INLINE int64_t find_image(const ImageSlot* slots, int64_t num_images, int64_t index, Field field) {
  int64_t lo = 0, hi = num_images - 1;
  while (lo < hi) {  // the last image whose offset is <= index
    const int64_t mid = (lo + hi + 1) / 2;
    if (field(slots[mid]) <= index)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

HOST_DEVICE_INLINE int lowest_bit(uint64_t x) {
#ifdef __CUDA_ARCH__
  return __ffsll(static_cast<long long>(x)) - 1;
#else
  return __builtin_ctzll(x);
#endif
}

// Integer add that is atomic on the device; on the host each image is counted by one thread.
HOST_DEVICE_INLINE void add_count(int32_t* target, int32_t value) {
#ifdef __CUDA_ARCH__
  atomicAdd(target, value);
#else
  *target += value;
#endif
}

// The CPU launchers' Team for the shared bodies written over a team of lanes: one lane doing all the work.
struct SerialTeam {
  int64_t lane = 0, lanes = 1;
  void sync() const {}
  double sum(double x) const { return x; }
};

}  // namespace moduseg
