// CPU batched mask NMS + confidence-priority rasteriser. Masks are bit-packed once (64 pixels a word), so areas and
// the pairwise intersections of same-class masks are popcounts over the word range both masks touch; the greedy pass
// then only reads a precomputed suppression table, and the rasteriser walks the kept masks word by word.
#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

namespace moduseg {

namespace {

inline int popcount64(uint64_t x) { return __builtin_popcountll(x); }

// Popcount of a & b over words [lo, hi]. Cloned for CPUs with the POPCNT instruction (chosen at load time): the
// portable build would otherwise call libgcc's bit-twiddling popcount.
__attribute__((target_clones("popcnt", "default")))
int64_t intersection_count(const uint64_t* a, const uint64_t* b, int64_t lo, int64_t hi) {
  int64_t total = 0;
  for (int64_t w = lo; w <= hi; ++w) total += __builtin_popcountll(a[w] & b[w]);
  return total;
}
inline int ctz64(uint64_t x) { return __builtin_ctzll(x); }

// Eight mask bytes (nonzero = covered) -> eight bits, byte i -> bit i.
inline uint64_t pack8(const uint8_t* bytes) {
  uint64_t x;
  std::memcpy(&x, bytes, 8);
  const uint64_t low7 = 0x7F7F7F7F7F7F7F7FULL;
  // High bit of each byte set iff the byte is nonzero (no carry crosses a byte).
  const uint64_t nonzero = (((x & low7) + low7) | x) & 0x8080808080808080ULL;
  // Gather the eight high bits into the top byte: byte i lands on bit 56 + i.
  return ((nonzero >> 7) * 0x0102040810204080ULL) >> 56;
}

struct PackedMasks {
  int64_t words = 0;              // words per mask
  std::vector<uint64_t> bits;     // count x words
  std::vector<int64_t> area;      // covered pixels
  std::vector<int64_t> first;     // first nonzero word (words if empty)
  std::vector<int64_t> last;      // last nonzero word (-1 if empty)
};

void pack_masks(const uint8_t* masks, int64_t count, int64_t pixels, PackedMasks& packed, int threads) {
  const int64_t words = (pixels + 63) / 64;
  packed.words = words;
  packed.bits.assign(static_cast<size_t>(count * words), 0);
  packed.area.assign(static_cast<size_t>(count), 0);
  packed.first.assign(static_cast<size_t>(count), words);
  packed.last.assign(static_cast<size_t>(count), -1);
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
#endif
  for (int64_t n = 0; n < count; ++n) {
    const uint8_t* mask = masks + n * pixels;
    uint64_t* out = packed.bits.data() + n * words;
    int64_t area = 0, first = words, last = -1;
    for (int64_t w = 0; w < words; ++w) {
      const int64_t base = w * 64;
      uint64_t word = 0;
      if (base + 64 <= pixels) {
        for (int k = 0; k < 8; ++k) word |= pack8(mask + base + 8 * k) << (8 * k);
      } else {
        for (int64_t p = base; p < pixels; ++p) word |= static_cast<uint64_t>(mask[p] != 0) << (p - base);
      }
      out[w] = word;
      if (word) {
        area += popcount64(word);
        if (first == words) first = w;
        last = w;
      }
    }
    packed.area[n] = area;
    packed.first[n] = first;
    packed.last[n] = last;
  }
}

}  // namespace

void mask_nms_raster_cpu(const uint8_t* masks, int64_t count, int64_t height, int64_t width, const int32_t* classes,
                         const double* scores, double iou_threshold, int32_t background, uint8_t* keep,
                         int32_t* label_map, int32_t* owner, int num_threads) {
  const int64_t pixels = height * width;
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  const int threads = 1;
  (void)num_threads;
#endif
  std::fill(keep, keep + count, uint8_t{0});
  if (count == 0) {
    std::fill(label_map, label_map + pixels, background);
    std::fill(owner, owner + pixels, int32_t{-1});
    return;
  }

  PackedMasks packed;
  pack_masks(masks, count, pixels, packed, threads);
  const int64_t words = packed.words;

  // Processing order: score descending, equal scores in index order (stable).
  std::vector<int64_t> order(static_cast<size_t>(count));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [scores](int64_t a, int64_t b) { return scores[a] > scores[b]; });

  // suppress[i * count + j]: same class and IoU(i, j) > threshold. Pairs whose word ranges do not overlap have no
  // intersection, so their IoU is 0 (also when the union is empty) and they suppress only if 0 > threshold.
  const uint8_t disjoint_suppresses = 0.0 > iou_threshold;
  std::vector<uint8_t> suppress(static_cast<size_t>(count * count), 0);
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
#endif
  for (int64_t i = 0; i < count; ++i) {
    const uint64_t* a = packed.bits.data() + i * words;
    for (int64_t j = i + 1; j < count; ++j) {
      if (classes[i] != classes[j]) continue;
      const int64_t lo = std::max(packed.first[i], packed.first[j]);
      const int64_t hi = std::min(packed.last[i], packed.last[j]);
      uint8_t s = disjoint_suppresses;
      if (lo <= hi) {
        const uint64_t* b = packed.bits.data() + j * words;
        const int64_t inter = intersection_count(a, b, lo, hi);
        const int64_t uni = packed.area[i] + packed.area[j] - inter;
        // Same float64 division as the reference: inter / union, compared with the threshold.
        const double iou = uni ? static_cast<double>(inter) / static_cast<double>(uni) : 0.0;
        s = iou > iou_threshold;
      }
      suppress[i * count + j] = s;
      suppress[j * count + i] = s;
    }
  }

  // Greedy pass in processing order.
  std::vector<int64_t> kept;
  kept.reserve(static_cast<size_t>(count));
  for (int64_t i : order) {
    const uint8_t* row = suppress.data() + i * count;
    bool suppressed = false;
    for (int64_t j : kept) {
      if (row[j]) {
        suppressed = true;
        break;
      }
    }
    if (!suppressed) {
      keep[i] = 1;
      kept.push_back(i);
    }
  }

  // Rasterise word by word: each pixel takes the first kept mask (in processing order) that covers it.
  const int64_t kept_count = static_cast<int64_t>(kept.size());
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
  for (int64_t w = 0; w < words; ++w) {
    const int64_t base = w * 64;
    const int64_t valid = std::min<int64_t>(64, pixels - base);
    std::fill(label_map + base, label_map + base + valid, background);
    std::fill(owner + base, owner + base + valid, int32_t{-1});
    uint64_t free_bits = valid == 64 ? ~uint64_t{0} : ((uint64_t{1} << valid) - 1);
    for (int64_t k = 0; k < kept_count && free_bits; ++k) {
      const int64_t n = kept[k];
      if (w < packed.first[n] || w > packed.last[n]) continue;
      uint64_t bits = packed.bits[n * words + w] & free_bits;
      if (!bits) continue;
      free_bits &= ~bits;
      const int32_t label = classes[n];
      while (bits) {
        const int64_t p = base + ctz64(bits);
        label_map[p] = label;
        owner[p] = static_cast<int32_t>(n);
        bits &= bits - 1;
      }
    }
  }
}

}  // namespace moduseg
