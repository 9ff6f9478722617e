// CPU launcher of the top-k selection: top_k_row over the rows in an OpenMP loop.
#include "cpu_parallel.h"
#include "topk/topk.h"

namespace moduseg {

void top_k_cpu(const TopKArgs& args, int num_threads) {
  parallel_for(args.rows, args.rows * args.columns > 65536, num_threads,
               [&args](int64_t row) { top_k_row(args, row); });
}

}  // namespace moduseg
