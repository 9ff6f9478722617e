// Exact top-k of each row of a score matrix (the bank search's selection), with the engine's one tie rule: the
// higher score first, equal scores the lower column (bank row) first, NaN after every number (engine.topk). Each
// row is scanned once, keeping its best k so far sorted in a small buffer: a score is compared with the k-th best
// and inserted only when it beats it, so a row of n scores costs about n comparisons. `offsets` (one per column,
// the bank's hubness penalty) are added to the scores first, in float32 as NumPy adds them.
// The NumPy twins that define the result are engine.topk.top_k and top_k_reference.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace moduseg {

struct TopKArgs {
  const float* scores = nullptr;   // rows x columns
  const float* offsets = nullptr;  // columns, or null
  int64_t rows = 0, columns = 0, k = 0;  // k <= columns
  float* values = nullptr;         // rows x k, best first
  int64_t* ids = nullptr;          // rows x k
};

// Whether (score a, column i) ranks before (score b, column j).
HOST_DEVICE_INLINE bool ranks_before(float a, int64_t i, float b, int64_t j) {
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan || b_nan) return !a_nan || (b_nan && i < j);
  return a > b || (a == b && i < j);
}

HOST_DEVICE_INLINE void top_k_row(const TopKArgs& args, int64_t row) {
  const float* scores = args.scores + row * args.columns;
  float* values = args.values + row * args.k;
  int64_t* ids = args.ids + row * args.k;
  int64_t held = 0;
  for (int64_t j = 0; j < args.columns; ++j) {
    const float s = args.offsets ? scores[j] + args.offsets[j] : scores[j];
    if (held == args.k && !ranks_before(s, j, values[held - 1], ids[held - 1])) continue;
    int64_t at = held < args.k ? held++ : held - 1;  // the slot freed: the end, or the k-th best's
    for (; at > 0 && ranks_before(s, j, values[at - 1], ids[at - 1]); --at) {
      values[at] = values[at - 1];
      ids[at] = ids[at - 1];
    }
    values[at] = s;
    ids[at] = j;
  }
}

// CPU only: on a GPU the search selects with torch.topk (engine.topk.top_k_torch), which spreads a row over threads.
void top_k_cpu(const TopKArgs& args, int num_threads);

}  // namespace moduseg
