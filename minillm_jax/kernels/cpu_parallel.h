// parallel_for for the C++ kernels (cpu_attention.cc, cpu_matmul.cc): work items on the calling thread and
// XLA's intra-op pool, the threads XLA:CPU runs its own ops on, so a kernel adds no thread pool of its own.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace minillm {

// Runs fn(item) for item in [0, n) on the caller and the XLA intra-op pool. Items are claimed from a shared
// counter, and the caller waits for finished items, not for tasks: a task the pool starts late finds nothing
// left and only touches the shared state it co-owns, so a busy or missing pool cannot deadlock the call.
template <typename F>
void parallel_for(xla::ffi::ThreadPool& pool, int n, F fn) {
  struct State {
    std::atomic<int> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto st = std::make_shared<State>();
  auto work = [st, n, fn]() {
    for (int i; (i = st->next.fetch_add(1)) < n;) {
      fn(i);
      if (st->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> l(st->mu);
        st->cv.notify_all();
      }
    }
  };
  int helpers = std::min<long>(pool.num_threads(), n) - 1;
  for (int t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> l(st->mu);
  st->cv.wait(l, [&] { return st->done.load() == n; });
}

}  // namespace minillm
