// Failures only the device sees (kernels/pool_pages.cuh: a full pool, a
// sequence at max_tokens_per_seq, a plan-based rollback refused) are recorded per (layer, slot) with a
// host-mapped flag; poll_failures turns them into one kvcomp::Error naming
// each sequence and its layers, clears them, and refreshes the token mirror.
#include <string>
#include <vector>

#include "cache_impl.hpp"
#include "launch.hpp"

namespace kvcomp {

using detail::check_cuda;

void Cache::Impl::poll_failures(const char* call) {
  volatile int32_t* flag = static_cast<volatile int32_t*>(fail_flag.ptr);
  if (*flag == 0) return;
  check_cuda(cudaDeviceSynchronize(), "failure record sync");
  std::vector<int32_t> why(fail.count);
  check_cuda(cudaMemcpy(why.data(), fail.ptr, why.size() * sizeof(int32_t), cudaMemcpyDeviceToHost),
             "failure record copy");
  check_cuda(cudaMemset(fail.ptr, 0, fail.count * sizeof(int32_t)), "failure record clear");
  *flag = 0;
  tokens_stale = true;
  refresh_tokens();
  const char* names[] = {"", "the pool is full", "max_tokens_per_seq reached", "stale token count",
                         "rollback refused"};
  std::string msg;
  bool appends = false, rollbacks = false;
  for (int reason = detail::kFailPoolFull; reason <= detail::kFailRollback; ++reason) {
    std::string seqs;
    for (int s = 0; s < cfg.max_seqs; ++s) {
      int first = -1, last = -1, n = 0;
      for (int l = 0; l < cfg.layers; ++l)
        if (why[at(l, s)] == reason) {
          if (first < 0) first = l;
          last = l;
          ++n;
        }
      if (n == 0) continue;
      seqs += std::string(seqs.empty() ? "" : ", ") + "sequence " + std::to_string(s) + " (" +
              (n == 1 ? "layer " + std::to_string(first)
                      : std::to_string(n) + " layers in " + std::to_string(first) + ".." + std::to_string(last)) +
              ")";
    }
    if (seqs.empty()) continue;
    msg += std::string(msg.empty() ? "" : "; ") + names[reason] + ": " + seqs;
    (reason == detail::kFailRollback ? rollbacks : appends) = true;
  }
  if (msg.empty()) return;  // records of removed sequences only
  std::string what = std::string(call) + ": earlier device work failed, " + msg;
  if (appends)
    what += "; those appends stored nothing (tokens() tells what each layer holds): remove sequences or raise "
            "config.pool_bytes, then redo the step for those sequences";
  if (rollbacks)
    what += "; a refused rollback took nothing back (at most Config::max_rollback tokens below the most a "
            "sequence held, with every layer at the same count)";
  throw Error(what);
}

void Cache::check(cudaStream_t stream) {
  check_cuda(cudaStreamSynchronize(stream), "check sync");
  impl_->poll_failures("check");
}

}  // namespace kvcomp
