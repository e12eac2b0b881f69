#include "stop_signals.hpp"

#include <csignal>
#include <ctime>
#include <unistd.h>

#include <spdlog/spdlog.h>

namespace natspubsub::workers {
namespace {

sigset_t stop_set() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  return set;
}

// As early as our code runs (the executable's first constructor, before main): SIGTERM and SIGINT
// are blocked, so one that comes before StopSignals exists waits for it instead of killing the
// process. Only the dynamic loader's first milliseconds, before any code of ours, stay exposed.
__attribute__((constructor(101))) void block_stop_signals_early() {
  const sigset_t set = stop_set();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

}  // namespace

StopSignals::StopSignals() {
  const sigset_t set = stop_set();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  waiter_ = std::jthread([this](std::stop_token st) {
    const sigset_t wanted = stop_set();
    const timespec poll{0, 100 * 1000 * 1000};  // 100 ms: how soon the destructor's stop is seen
    while (!st.stop_requested()) {
      siginfo_t info;
      const int sig = sigtimedwait(&wanted, &info, &poll);
      if (sig < 0) continue;  // timeout or EINTR
      if (!running_.load()) _exit(0);
      spdlog::info("{} received: finishing the batch in flight, then exiting", sig == SIGTERM ? "SIGTERM" : "SIGINT");
      source_.request_stop();
    }
  });
}

StopSignals::~StopSignals() {
  waiter_.request_stop();
  if (waiter_.joinable()) waiter_.join();
}

}  // namespace natspubsub::workers
