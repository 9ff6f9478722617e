// CPU launcher of the vote: vote_query over the queries in an OpenMP loop.
#ifdef _OPENMP
#include <omp.h>
#endif

#include "vote/vote.h"

namespace moduseg {

void vote_cpu(const VoteArgs& args, int num_threads) {
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (args.queries * args.k > 65536)
#else
  (void)num_threads;
#endif
  for (int64_t q = 0; q < args.queries; ++q) vote_query(args, q);
}

}  // namespace moduseg
