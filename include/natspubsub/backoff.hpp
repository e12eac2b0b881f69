#pragma once
// How long a failed message waits before its next attempt. The runtime computes the delay from
// the delivery count JetStream keeps for the message, so a restart does not reset the schedule.
//
//   auto exp = natspubsub::Backoff::exponential(Millis{500}, Millis{60000});  // 0.5 s, 1 s, 2 s, ... 60 s
//   auto list = natspubsub::Backoff::list({Millis{1000}, Millis{5000}, Millis{30000}});
//   list.delay(1);   // 1000 ms: after the first failed attempt
//   list.delay(7);   // 30000 ms: past the end the last delay repeats
//
// A delay is never shorter than the schedule says: jitter only adds time, so tests and
// operators can rely on "at least this long".
#include <cstdint>
#include <string>
#include <vector>

#include <natspubsub/config.hpp>

namespace natspubsub {

class Backoff {
 public:
  /// `initial` after the first failure, multiplied by `multiplier` after each further one; the
  /// base delay stops growing at `cap`. Jitter adds a random 0..`jitter` fraction of the base
  /// on top (so the longest delay is cap * (1 + jitter)). Throws ConfigError on bad values.
  [[nodiscard]] static Backoff exponential(Millis initial, Millis cap, double multiplier = 2.0, double jitter = 0.2);

  /// The delays as listed, without jitter; attempts past the end reuse the last delay.
  /// Throws ConfigError when the list is empty or a delay is not positive.
  [[nodiscard]] static Backoff list(std::vector<Millis> delays);

  /// The delay to wait after failed attempt `attempt` (1-based) before the next one.
  [[nodiscard]] Millis delay(uint64_t attempt) const;
  /// Same, with the random part given as `unit` in [0, 1): for tests and reproducible runs.
  [[nodiscard]] Millis delay(uint64_t attempt, double unit) const;

  /// The delay without jitter (the lower bound of delay()).
  [[nodiscard]] Millis base_delay(uint64_t attempt) const;
  /// The upper bound of delay().
  [[nodiscard]] Millis max_delay(uint64_t attempt) const;

  /// "list [50ms, 100ms]" or "exponential 500ms x2 cap 60000ms jitter 0.2": for logs.
  [[nodiscard]] std::string describe() const;

 private:
  Backoff() = default;
  enum class Kind { list, exponential } kind_ = Kind::list;
  std::vector<Millis> delays_;
  Millis initial_{0};
  Millis cap_{0};
  double multiplier_ = 1.0;
  double jitter_ = 0.0;
};

}  // namespace natspubsub
