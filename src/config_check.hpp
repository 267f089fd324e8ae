// What a kvcomp::Config may hold: the checks the Cache constructor runs
// before it allocates anything, each failure a kvcomp::Error naming the field.
#pragma once

#include "kvcomp/cache.hpp"

namespace kvcomp {
namespace detail {

/// Throws kvcomp::Error naming the first field that is out of range.
void validate(const Config& c);

/// Queries one attend() call may take: Config::max_attend_batch, or
/// min(max_seqs, kMaxBatch) when it is 0.
int attend_batch_limit(const Config& c);

}  // namespace detail
}  // namespace kvcomp
