// Eager appends: the block jobs worked out on the device from the append's
// entries (one per sequence: slot, tokens and blocks held, tokens appended,
// its jobs' range) and each entry's first input token, with the formula the host's
// plan_store uses (append_job, store_job.cuh). Only the entries and tail
// copies cross from the host.
#pragma once

#include <cstdint>

#include "store_job.cuh"

namespace kvcomp {
namespace detail {

/// One thread per job: its entry is the last whose jobs begin at or before it
/// (entries without jobs share their begin with the next one, which wins).
__global__ void append_jobs_kernel(const AppendJobsParams p) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.n_jobs) return;
  int e = 0;
  for (int step = 1 << 30; step > 0; step >>= 1)
    if (e + step < p.n_entries && p.entries[e + step].job_begin <= i) e += step;
  const AppendEntry a = p.entries[e];
  const int H = p.g.tails.kv_heads;
  const int q = int(i - a.job_begin), b = q / H, h = q % H;
  p.jobs[i] = append_job(p.g, a.slot, a.expected, a.closed, p.tok0[e], b, h, uint32_t(e), p.bounds[2 * h],
                         p.bounds[2 * h + 1]);
}

}  // namespace detail
}  // namespace kvcomp
