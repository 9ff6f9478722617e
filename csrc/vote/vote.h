// The vote over each query's K nearest bank vectors (best first), one body for both launchers:
//   1. score per class among the neighbours: their count ("count", the paper's vote), that count divided by the
//      class's bank size ("balanced"), their summed similarity ("weighted"), or the sum of exp((s - s_max) / T)
//      over their similarities s ("softmax": s_max the query's best similarity, T the temperature, so the nearest
//      neighbours weigh most and K matters little);
//   2. a tie in score goes to the larger summed similarity; 3. an exact tie to the class met first in rank order.
// Confidence = mean similarity of the winning class's neighbours. Neighbour slots whose class is outside
// [0, num_classes) (the search's "no result", -1) are ignored; a query with none gets class 0, confidence 0.
// Optionally each query's class shares: the scores of step 1 divided by their sum (a row of zeros for a query
// with no neighbour), which the superpixel vote adds up (engine.retrieval).
// Sums (and the exponentials) are in double, in rank order. O(K^2) per query and no per-class storage, so any
// number of classes works.
// The NumPy twin that defines the result is engine.reference.vote.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace moduseg {

enum VoteMethod : int32_t { kVoteCount = 0, kVoteBalanced = 1, kVoteWeighted = 2, kVoteSoftmax = 3 };

struct VoteArgs {
  const float* similarities = nullptr;  // queries x k
  const int64_t* labels = nullptr;      // queries x k neighbour class ids
  const int64_t* class_counts = nullptr;  // num_classes bank vectors per class (balanced vote)
  int64_t queries = 0, k = 0, num_classes = 0;
  int32_t method = kVoteCount;
  double temperature = 1.0;  // the softmax vote's T (> 0)
  int32_t* winner = nullptr;   // queries
  float* confidence = nullptr;  // queries
  float* shares = nullptr;      // queries x num_classes, or null: no shares
};

HOST_DEVICE_INLINE void vote_query(const VoteArgs& args, int64_t q) {
  const float* sim = args.similarities + q * args.k;
  const int64_t* label = args.labels + q * args.k;
  int64_t best = -1, best_count = 0;
  double best_score = 0.0, best_sum = 0.0;
  double top = 0.0;  // the best valid similarity: the softmax vote's exponents are <= 0, so none overflows
  bool any = false;
  float* shares = args.shares ? args.shares + q * args.num_classes : nullptr;
  for (int64_t c = 0; shares && c < args.num_classes; ++c) shares[c] = 0.0f;
  double total = 0.0;  // of the scores, for the shares
  for (int64_t i = 0; i < args.k && args.method == kVoteSoftmax; ++i) {  // only the softmax vote reads it
    if (label[i] < 0 || label[i] >= args.num_classes) continue;
    const double s = static_cast<double>(sim[i]);
    if (!any || s > top) top = s;
    any = true;
  }
  for (int64_t i = 0; i < args.k; ++i) {
    const int64_t c = label[i];
    if (c < 0 || c >= args.num_classes) continue;
    bool seen = false;  // each class is scored at its first neighbour
    for (int64_t j = 0; j < i && !seen; ++j) seen = label[j] == c;
    if (seen) continue;
    int64_t count = 0;
    double sum = 0.0, soft = 0.0;
    for (int64_t j = i; j < args.k; ++j) {
      if (label[j] == c) {
        ++count;
        sum += static_cast<double>(sim[j]);
        if (args.method == kVoteSoftmax) soft += exp((static_cast<double>(sim[j]) - top) / args.temperature);
      }
    }
    double score = static_cast<double>(count);
    if (args.method == kVoteBalanced) {
      const int64_t size = args.class_counts[c];
      score /= static_cast<double>(size > 1 ? size : 1);
    } else if (args.method == kVoteWeighted) {
      score = sum;
    } else if (args.method == kVoteSoftmax) {
      score = soft;
    }
    if (shares) shares[c] = static_cast<float>(score);
    total += score;
    if (best < 0 || score > best_score || (score == best_score && sum > best_sum)) {
      best = c;
      best_score = score;
      best_sum = sum;
      best_count = count;
    }
  }
  for (int64_t c = 0; shares && total != 0.0 && c < args.num_classes; ++c)
    shares[c] = static_cast<float>(static_cast<double>(shares[c]) / total);
  args.winner[q] = static_cast<int32_t>(best < 0 ? 0 : best);
  args.confidence[q] = best < 0 ? 0.0f : static_cast<float>(best_sum / static_cast<double>(best_count));
}

void vote_cpu(const VoteArgs& args, int num_threads);
void vote_cuda(const VoteArgs& args, int device, void* stream);

}  // namespace moduseg
