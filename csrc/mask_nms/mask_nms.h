// Class-specific greedy mask NMS + confidence-priority rasterisation over regions made of atoms, batched over
// images. Areas and intersections are sums of atom areas (exact integers) over 64-bit membership words, so the
// greedy pass never touches pixels. Per image, in processing order (score descending, equal scores by index), a
// region is suppressed when its IoU with an already kept region of the same class is > iou_threshold (an empty union
// has IoU 0); with has_drop_class, regions of class `drop_class` (the vote's background) are never kept. Kept regions paint their
// atoms in the same order, an atom keeping its first; unpainted pixels get `background` and owner -1.
//
// Bodies, each shared by both launchers, in the order they run:
//   count_pixel     per pixel: its atom's area (atomic on the device);
//   pack_region     per region: membership bits and area;
//   rank_region     per region: its position in processing order;
//   greedy_image    per image: the greedy pass and the atoms' owners (sequential by definition);
//   paint_pixel     per pixel: label and owner.
// The NumPy twin that defines the result is engine.reference.mask_nms_raster_reference.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace moduseg {

struct NmsArgs {
  const int32_t* classes = nullptr;  // per region (batch rows)
  const double* scores = nullptr;
  const int32_t* ids = nullptr;  // what `owner` records for each region (null: its index in its image)
  uint8_t* keep = nullptr;       // per region, 0/1
  double iou_threshold = 0.5;
  int32_t background = 0, drop_class = 0;
  bool has_drop_class = false;
};

// Scratch of a batch: per atom (batch atom slots) and per region (batch rows) / per word.
struct NmsScratch {
  int32_t* atom_area = nullptr;   // zeroed before count_pixel
  int32_t* atom_owner = nullptr;  // written by greedy_image
  uint64_t* bits = nullptr;       // count x words per image
  int64_t* area = nullptr;
  int32_t* order = nullptr;       // per image: order[r] = the region processed r-th
};

HOST_DEVICE_INLINE void count_pixel(const ImageSlot& img, int64_t pixel, const NmsScratch& s) {
  const int32_t a = img.atoms[pixel];
  if (a >= 0 && a < img.num_atoms) add_count(s.atom_area + img.atom_offset + a, 1);
}

HOST_DEVICE_INLINE void pack_region(const ImageSlot& img, int64_t n, const NmsScratch& s) {
  const int64_t words = words_for(img.num_atoms);
  const uint8_t* member = img.members + n * img.num_atoms;
  uint64_t* bits = s.bits + img.word_offset + n * words;
  int64_t area = 0;
  for (int64_t w = 0; w < words; ++w) {
    uint64_t word = 0;
    for (int64_t a = w * 64; a < img.num_atoms && a < w * 64 + 64; ++a) {
      if (member[a]) {
        word |= uint64_t{1} << (a - w * 64);
        area += s.atom_area[img.atom_offset + a];
      }
    }
    bits[w] = word;
  }
  s.area[img.region_offset + n] = area;
}

HOST_DEVICE_INLINE void rank_region(const ImageSlot& img, int64_t n, const NmsArgs& args, const NmsScratch& s) {
  const double* score = args.scores + img.region_offset;
  int64_t rank = 0;
  for (int64_t j = 0; j < img.count; ++j) rank += score[j] > score[n] || (score[j] == score[n] && j < n);
  s.order[img.region_offset + rank] = static_cast<int32_t>(n);
}

HOST_DEVICE_INLINE int64_t intersection(const uint64_t* a, const uint64_t* b, int64_t words,
                                        const int32_t* atom_area) {
  int64_t total = 0;
  for (int64_t w = 0; w < words; ++w) {
    for (uint64_t both = a[w] & b[w]; both; both &= both - 1) total += atom_area[w * 64 + lowest_bit(both)];
  }
  return total;
}

HOST_DEVICE_INLINE void greedy_image(const ImageSlot& img, const NmsArgs& args, const NmsScratch& s) {
  const int64_t words = words_for(img.num_atoms), first = img.region_offset;
  const int32_t* atom_area = s.atom_area + img.atom_offset;
  int32_t* owner = s.atom_owner + img.atom_offset;
  for (int64_t a = 0; a < img.num_atoms; ++a) owner[a] = -1;
  for (int64_t r = 0; r < img.count; ++r) {
    const int64_t i = s.order[first + r];
    args.keep[first + i] = 0;
    const int32_t cls = args.classes[first + i];
    if (args.has_drop_class && cls == args.drop_class) continue;
    const uint64_t* bits_i = s.bits + img.word_offset + i * words;
    bool suppressed = false;
    for (int64_t q = 0; q < r && !suppressed; ++q) {  // the regions kept before it, of its class
      const int64_t j = s.order[first + q];
      if (!args.keep[first + j] || args.classes[first + j] != cls) continue;
      const int64_t inter = intersection(bits_i, s.bits + img.word_offset + j * words, words, atom_area);
      const int64_t uni = s.area[first + i] + s.area[first + j] - inter;
      const double iou = uni ? static_cast<double>(inter) / static_cast<double>(uni) : 0.0;
      suppressed = iou > args.iou_threshold;
    }
    if (suppressed) continue;
    args.keep[first + i] = 1;
    for (int64_t w = 0; w < words; ++w) {  // an atom keeps the first kept region that covers it
      for (uint64_t word = bits_i[w]; word; word &= word - 1) {
        const int64_t a = w * 64 + lowest_bit(word);
        if (owner[a] < 0) owner[a] = static_cast<int32_t>(i);
      }
    }
  }
}

HOST_DEVICE_INLINE void paint_pixel(const ImageSlot& img, int64_t pixel, const NmsArgs& args, const NmsScratch& s) {
  const int32_t a = img.atoms[pixel];
  const int32_t n = a >= 0 && a < img.num_atoms ? s.atom_owner[img.atom_offset + a] : -1;
  img.owner[pixel] = n < 0 ? -1 : args.ids ? args.ids[img.region_offset + n] : n;
  img.label_map[pixel] = n < 0 ? args.background : args.classes[img.region_offset + n];
}

// Launchers: slots (host memory) with atoms, members, label_map and owner set; the NmsArgs arrays are per batch
// row (sum of counts). Host pointers for the CPU launcher, device pointers for the CUDA one.
void mask_nms_raster_cpu(ImageSlot* slots, int64_t num_images, const NmsArgs& args, int num_threads);
void mask_nms_raster_cuda(ImageSlot* slots, int64_t num_images, const NmsArgs& args, int device, void* stream);

}  // namespace moduseg
