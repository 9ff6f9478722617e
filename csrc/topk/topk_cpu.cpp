// CPU launcher of the top-k selection: top_k_row over the rows in an OpenMP loop.
#ifdef _OPENMP
#include <omp.h>
#endif

#include "topk/topk.h"

namespace moduseg {

void top_k_cpu(const TopKArgs& args, int num_threads) {
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (args.rows * args.columns > 65536)
#else
  (void)num_threads;
#endif
  for (int64_t row = 0; row < args.rows; ++row) top_k_row(args, row);
}

}  // namespace moduseg
