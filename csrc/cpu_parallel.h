// The CPU launchers' loops: body(i) for every i in [0, n), spread over OpenMP threads (num_threads 0: OpenMP's
// default), in the calling thread alone when `worth_threads` is false (too little work for a team's fork and join).
// parallel_for splits the range evenly (items of equal cost: rows); parallel_for_each hands out one item at a time
// to whichever thread is free (items of uneven cost: images, chunks of patches).
#pragma once

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace moduseg {

template <typename Body>
void parallel_for(int64_t n, bool worth_threads, int num_threads, const Body& body) {
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (worth_threads)
#else
  (void)worth_threads;
  (void)num_threads;
#endif
  for (int64_t i = 0; i < n; ++i) body(i);
}

template <typename Body>
void parallel_for_each(int64_t n, bool worth_threads, int num_threads, const Body& body) {
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (worth_threads)
#else
  (void)worth_threads;
  (void)num_threads;
#endif
  for (int64_t i = 0; i < n; ++i) body(i);
}

}  // namespace moduseg
