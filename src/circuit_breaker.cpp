#include <natspubsub/circuit_breaker.hpp>

#include <algorithm>

#include <natspubsub/log.hpp>

#include "printable.hpp"

namespace natspubsub {

const char* to_string(CircuitState state) noexcept {
  switch (state) {
    case CircuitState::closed: return "closed";
    case CircuitState::open: return "open";
    case CircuitState::half_open: return "half_open";
  }
  return "unknown";
}

void CircuitBreakerOptions::validate() const {
  if (name.empty()) throw ConfigError("circuit_breaker.name", "must not be empty");
  if (failure_threshold < 1) throw ConfigError("circuit_breaker.failure_threshold", "must be >= 1");
  if (window.count() <= 0) throw ConfigError("circuit_breaker.window", "must be greater than 0 ms");
  if (open_duration.count() <= 0) throw ConfigError("circuit_breaker.open_duration", "must be greater than 0 ms");
  if (half_open_probes < 1) throw ConfigError("circuit_breaker.half_open_probes", "must be >= 1");
}

nlohmann::json CircuitBreakerStats::to_json() const {
  return {{"name", name},
          {"state", to_string(state)},
          {"successes", successes},
          {"failures", failures},
          {"rejected", rejected},
          {"opened", opened},
          {"closed", closed},
          {"failures_in_window", failures_in_window},
          {"last_error", last_error},
          {"last_transition", last_transition == SystemTime{} ? std::string() : format_timestamp(last_transition)},
          {"retry_after_ms", retry_after.count()}};
}

CircuitBreaker::CircuitBreaker(CircuitBreakerOptions options) : options_(std::move(options)) { options_.validate(); }

void CircuitBreaker::prune(Clock::time_point now) {
  while (!failure_times_.empty() && now - failure_times_.front() >= options_.window) failure_times_.pop_front();
}

CircuitBreaker::Transition CircuitBreaker::move_to(CircuitState to, Clock::time_point now) {
  Transition t{state_, to};
  if (to == state_) return t;
  state_ = to;
  last_transition_ = now_ms();
  switch (to) {
    case CircuitState::open:
      opened_at_ = now;
      opened_++;
      break;
    case CircuitState::half_open:
      probes_out_ = 0;
      probe_successes_ = 0;
      probes_started_ = now;
      break;
    case CircuitState::closed:
      failure_times_.clear();
      closed_++;
      break;
  }
  return t;
}

CircuitBreaker::Transition CircuitBreaker::refresh(Clock::time_point now) {
  if (state_ == CircuitState::open && now - opened_at_ >= options_.open_duration)
    return move_to(CircuitState::half_open, now);
  return {state_, state_};
}

void CircuitBreaker::report(const Transition& t) {
  if (t.from == t.to) return;
  if (t.to == CircuitState::open) {
    std::string error;
    {
      std::lock_guard lock(mutex_);
      error = last_error_;
    }
    logger()->warn("circuit {}: {} -> open for {} ms (last error: {})", options_.name, to_string(t.from),
                   options_.open_duration.count(), detail::printable(error, 200));
  } else {
    logger()->info("circuit {}: {} -> {}", options_.name, to_string(t.from), to_string(t.to));
  }
  if (!options_.on_transition) return;
  try {
    options_.on_transition(t.from, t.to);
  } catch (const std::exception& e) {
    logger()->error("circuit {}: on_transition threw: {}", options_.name, e.what());
  } catch (...) {
    logger()->error("circuit {}: on_transition threw a non-standard exception", options_.name);
  }
}

bool CircuitBreaker::allow() {
  Transition t{};
  bool allowed = false;
  {
    std::lock_guard lock(mutex_);
    const auto now = Clock::now();
    t = refresh(now);
    switch (state_) {
      case CircuitState::closed:
        allowed = true;
        break;
      case CircuitState::open:
        break;
      case CircuitState::half_open:
        // A probe whose outcome never came back (its caller died, its message was handed back)
        // must not keep the circuit half-open for ever: after open_duration the probes are renewed.
        if (probes_out_ >= options_.half_open_probes && now - probes_started_ >= options_.open_duration) {
          probes_out_ = probe_successes_;
          probes_started_ = now;
        }
        if (probes_out_ < options_.half_open_probes) {
          probes_out_++;
          allowed = true;
        }
        break;
    }
    if (!allowed) rejected_++;
  }
  report(t);
  return allowed;
}

void CircuitBreaker::record_success() {
  Transition t{};
  {
    std::lock_guard lock(mutex_);
    const auto now = Clock::now();
    successes_++;
    t = refresh(now);
    if (state_ == CircuitState::half_open) {
      probe_successes_++;
      if (probe_successes_ >= options_.half_open_probes) t = move_to(CircuitState::closed, now);
    }
  }
  report(t);
}

void CircuitBreaker::record_failure(std::string_view error) {
  Transition t{};
  {
    std::lock_guard lock(mutex_);
    const auto now = Clock::now();
    failures_++;
    last_error_.assign(error);
    t = refresh(now);
    switch (state_) {
      case CircuitState::closed:
        failure_times_.push_back(now);
        prune(now);
        if (static_cast<int>(failure_times_.size()) >= options_.failure_threshold) t = move_to(CircuitState::open, now);
        break;
      case CircuitState::half_open:
        // One failed probe is enough: the dependency is still down.
        t = move_to(CircuitState::open, now);
        break;
      case CircuitState::open:
        // A call let through before the circuit opened: it changes nothing.
        break;
    }
  }
  report(t);
}

CircuitState CircuitBreaker::state() const {
  std::lock_guard lock(mutex_);
  if (state_ == CircuitState::open && Clock::now() - opened_at_ >= options_.open_duration)
    return CircuitState::half_open;
  return state_;
}

Millis CircuitBreaker::retry_after() const {
  std::lock_guard lock(mutex_);
  if (state_ != CircuitState::open) return Millis{0};
  const auto left = options_.open_duration - std::chrono::duration_cast<Millis>(Clock::now() - opened_at_);
  return left.count() > 0 ? left : Millis{0};
}

CircuitBreakerStats CircuitBreaker::stats() const {
  CircuitBreakerStats s;
  s.name = options_.name;
  s.state = state();
  s.retry_after = retry_after();
  std::lock_guard lock(mutex_);
  s.successes = successes_;
  s.failures = failures_;
  s.rejected = rejected_;
  s.opened = opened_;
  s.closed = closed_;
  const auto now = Clock::now();
  s.failures_in_window = static_cast<int>(
      std::count_if(failure_times_.begin(), failure_times_.end(), [&](auto t) { return now - t < options_.window; }));
  s.last_error = last_error_;
  s.last_transition = last_transition_;
  return s;
}

void CircuitBreaker::reset() {
  Transition t{};
  {
    std::lock_guard lock(mutex_);
    t = move_to(CircuitState::closed, Clock::now());
    failure_times_.clear();
  }
  report(t);
}

}  // namespace natspubsub
