#pragma once
// A circuit breaker: after `failure_threshold` failures within `window` it opens, and calls are
// refused at once for `open_duration` instead of piling onto a dependency that is down. Then it
// lets `half_open_probes` calls through; if they all succeed it closes again, if one fails it
// opens for another `open_duration`.
//
//   natspubsub::CircuitBreaker breaker({.name = "payments-api", .failure_threshold = 5,
//                                       .window = natspubsub::Millis{10000},
//                                       .open_duration = natspubsub::Millis{30000}});
//   try {
//     auto status = breaker.call([&] { return payments_api.charge(order); });
//   } catch (const natspubsub::CircuitOpenError& e) {
//     // refused without calling: e.retry_after() says when a probe will be let through
//   }
//
// The same breaker protects a Responder (an open circuit answers 503 "unavailable" at once) and a
// consumer subscription (an open circuit stops fetching; see SubscriptionOptions::circuit_breaker).
// Transitions are logged (warn when opening, info otherwise) and counted in stats().
// Thread-safe.
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <string_view>
#include <type_traits>

#include <nlohmann/json.hpp>

#include <natspubsub/config.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/error.hpp>

namespace natspubsub {

enum class CircuitState { closed, open, half_open };
[[nodiscard]] const char* to_string(CircuitState state) noexcept;

struct CircuitBreakerOptions {
  std::string name = "circuit";   ///< shown in logs, stats and errors
  int failure_threshold = 5;      ///< failures within `window` that open the circuit (>= 1)
  Millis window{60000};           ///< how far back failures count (> 0)
  Millis open_duration{30000};    ///< how long an open circuit refuses calls before probing (> 0)
  int half_open_probes = 1;       ///< calls let through while half-open; all must succeed to close (>= 1)
  /// Called on every state change, outside the breaker's lock (it may read stats()). Must not throw;
  /// an exception is logged and ignored.
  std::function<void(CircuitState from, CircuitState to)> on_transition{};

  /// Throws ConfigError("circuit_breaker.<field>", rule) for a value out of range.
  void validate() const;
};

/// A refused call: the circuit was open (or half-open with its probes taken).
class CircuitOpenError : public Error {
 public:
  CircuitOpenError(const std::string& name, Millis retry_after)
      : Error("circuit " + name + " is open; next probe in " + std::to_string(retry_after.count()) + " ms"),
        name_(name),
        retry_after_(retry_after) {}
  [[nodiscard]] const std::string& name() const noexcept { return name_; }
  [[nodiscard]] Millis retry_after() const noexcept { return retry_after_; }

 private:
  std::string name_;
  Millis retry_after_;
};

struct CircuitBreakerStats {
  std::string name;
  CircuitState state = CircuitState::closed;
  uint64_t successes = 0;           ///< recorded successes since construction
  uint64_t failures = 0;            ///< recorded failures since construction
  uint64_t rejected = 0;            ///< calls refused because the circuit was open
  uint64_t opened = 0;              ///< times the circuit opened (from closed or half-open)
  uint64_t closed = 0;              ///< times it closed again after probing
  int failures_in_window = 0;       ///< failures counted towards the threshold right now
  std::string last_error;           ///< the text given with the last failure
  SystemTime last_transition{};     ///< when the state last changed (epoch when it never did)
  Millis retry_after{0};            ///< while open: time until the next probe is let through

  /// {"name","state","successes","failures","rejected","opened","closed","failures_in_window",
  ///  "last_error","last_transition","retry_after_ms"}
  [[nodiscard]] nlohmann::json to_json() const;
};

class CircuitBreaker {
 public:
  explicit CircuitBreaker(CircuitBreakerOptions options = {});
  CircuitBreaker(const CircuitBreaker&) = delete;
  CircuitBreaker& operator=(const CircuitBreaker&) = delete;

  /// Asks to make one call. True: go ahead, then report the outcome with record_success() or
  /// record_failure(). False: refused (the circuit is open, or half-open with every probe out);
  /// counted in `rejected`. An open circuit whose open_duration has passed becomes half-open here.
  [[nodiscard]] bool allow();
  void record_success();
  void record_failure(std::string_view error = {});

  /// allow(), f(), record the outcome, return f's result. Throws CircuitOpenError when refused;
  /// an exception from f is recorded as a failure and rethrown.
  template <typename F>
  auto call(F&& f) -> std::invoke_result_t<F&> {
    if (!allow()) throw CircuitOpenError(options_.name, retry_after());
    try {
      if constexpr (std::is_void_v<std::invoke_result_t<F&>>) {
        f();
        record_success();
      } else {
        auto result = f();
        record_success();
        return result;
      }
    } catch (const std::exception& e) {
      record_failure(e.what());
      throw;
    } catch (...) {
      record_failure("non-standard exception");
      throw;
    }
  }

  /// The state now (an open circuit past its open_duration reads as half_open).
  [[nodiscard]] CircuitState state() const;
  /// While open: how long until a probe is let through; zero otherwise.
  [[nodiscard]] Millis retry_after() const;
  [[nodiscard]] CircuitBreakerStats stats() const;
  [[nodiscard]] const CircuitBreakerOptions& options() const noexcept { return options_; }

  /// Closes the circuit and forgets counted failures (operator action; logged).
  void reset();

 private:
  using Clock = std::chrono::steady_clock;
  struct Transition {
    CircuitState from;
    CircuitState to;
  };
  // Each returns the transition it made, so the caller can report it after unlocking.
  Transition move_to(CircuitState to, Clock::time_point now);
  Transition refresh(Clock::time_point now);
  void report(const Transition& t);
  void prune(Clock::time_point now);

  const CircuitBreakerOptions options_;
  mutable std::mutex mutex_;
  CircuitState state_ = CircuitState::closed;
  std::deque<Clock::time_point> failure_times_;  // within the window, at most failure_threshold
  Clock::time_point opened_at_{};
  int probes_out_ = 0;        // half-open: calls let through, outcome not yet recorded
  int probe_successes_ = 0;   // half-open: successes so far
  Clock::time_point probes_started_{};
  uint64_t successes_ = 0, failures_ = 0, rejected_ = 0, opened_ = 0, closed_ = 0;
  std::string last_error_;
  SystemTime last_transition_{};
};

}  // namespace natspubsub
