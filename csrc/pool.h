// The CPU device's one thread pool (defined in conv_kernels.cpp), for the other kernel files.
#pragma once

#include <cstdint>
#include <functional>

namespace offload {

// fn(i) for i in [0, count) on the pool (sized by set_num_threads, the calling thread included;
// idle helpers sleep), or on the calling thread alone when parallel is false, the pool has one
// thread or another caller holds it. Returns when every item is done; std::bad_alloc when an
// item threw.
void parallel_for(std::int64_t count, const std::function<void(std::int64_t)> &fn,
                  bool parallel = true);

// The pool's size (set_num_threads), the calling thread included.
int pool_threads();

}  // namespace offload
