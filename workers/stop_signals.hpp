#pragma once
// SIGTERM and SIGINT for a worker process, handled without a signal handler: both are blocked in
// every thread (construct this first in main, before any thread starts, so all threads inherit
// the mask) and a thread of ours takes them with sigtimedwait. Nothing runs in signal context.
//
//   int main() {
//     natspubsub::workers::StopSignals signals;       // first
//     ... start-up: a signal here ends the process at once with exit 0 (nothing is claimed yet)
//     signals.set_running();                          // from here a signal asks the loop to stop
//     relay.run(signals.token());
//   }
#include <atomic>
#include <stop_token>
#include <thread>

namespace natspubsub::workers {

class StopSignals {
 public:
  StopSignals();
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  /// Requested on the first SIGTERM or SIGINT once set_running() was called.
  [[nodiscard]] std::stop_token token() const { return source_.get_token(); }
  /// Before this, a signal ends the process with exit 0 at once: start-up holds no work to finish
  /// (a migration in progress is one transaction, rolled back by the database).
  void set_running() noexcept { running_.store(true); }

 private:
  std::stop_source source_;
  std::atomic<bool> running_{false};
  std::jthread waiter_;
};

}  // namespace natspubsub::workers
