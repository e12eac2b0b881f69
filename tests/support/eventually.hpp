#pragma once
// Polls a condition until it holds or a time limit passes: the bounded wait every network test
// needs instead of a fixed sleep.
#include <chrono>
#include <thread>

namespace natspubsub::testing {

template <typename Pred>
bool eventually(Pred pred, std::chrono::milliseconds limit = std::chrono::seconds(15)) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return pred();
}

}  // namespace natspubsub::testing
