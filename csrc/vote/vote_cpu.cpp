// CPU launcher of the vote: vote_query over the queries in an OpenMP loop.
#include "cpu_parallel.h"
#include "vote/vote.h"

namespace moduseg {

void vote_cpu(const VoteArgs& args, int num_threads) {
  parallel_for(args.queries, args.queries * args.k > 65536, num_threads,
               [&args](int64_t q) { vote_query(args, q); });
}

}  // namespace moduseg
