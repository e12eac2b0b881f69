#pragma once
// natspubsub-bench: each scenario runs the library and the hand-written cnats equivalent against
// the same servers in the same run, interleaved, and reports the medians and their ratio.
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "support/servers.hpp"

namespace natspubsub::bench {

/// Sizes of one run. --quick shrinks every count so the whole run takes seconds.
struct Settings {
  bool quick = false;
  int repetitions = 5;           ///< per side, for the fast scenarios
  int slow_repetitions = 3;      ///< per side, for the scenarios that take seconds per run
  int publish_sync_count = 5000;
  int publish_batch_count = 50000;
  int publish_window = 256;
  int relay_rows = 100000;
  int consume_count = 50000;
  int inbox_count = 5000;
  int latency_rate = 2000;       ///< messages per second
  int latency_seconds = 5;
  int memory_backlog = 1000000;
  int memory_small_backlog = 100000;

  [[nodiscard]] static Settings full();
  [[nodiscard]] static Settings quick_run();
};

/// What a scenario must reach, and whether it did.
struct Target {
  enum class Kind { none, ratio_at_least, ratio_at_most, library_at_most };
  Kind kind = Kind::none;
  double value = 0;

  [[nodiscard]] std::string describe() const;
};

struct Result {
  std::string scenario;
  std::string unit;              ///< "msgs/s", "us", "MB"
  std::string description;       ///< one line: what each side does
  double library = 0;            ///< median
  double baseline = 0;           ///< median
  std::vector<double> library_runs;
  std::vector<double> baseline_runs;
  Target target;
  std::optional<bool> extra_met;  ///< a second condition (memory: no growth with the backlog)
  nlohmann::json extra = nlohmann::json::object();  ///< counts, sizes, side notes
  nlohmann::json load_avg = nlohmann::json::array();  ///< 1/5/15 min when the scenario started

  [[nodiscard]] double ratio() const { return baseline != 0 ? library / baseline : 0; }
  [[nodiscard]] bool met() const;
};

/// Servers and scratch space shared by the scenarios of one run.
class Context {
 public:
  explicit Context(Settings settings);
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  [[nodiscard]] const Settings& settings() const noexcept { return settings_; }
  [[nodiscard]] std::string nats_url() const { return nats_.url(); }
  /// PostgreSQL is started on first use (it takes seconds).
  testing::PostgresServer& postgres();
  /// A fresh directory under the run's scratch directory.
  [[nodiscard]] std::string scratch_path(const std::string& name);
  /// The benchmark's own executable (for child processes).
  [[nodiscard]] static std::string self_exe();

 private:
  Settings settings_;
  testing::TempDir scratch_;
  testing::NatsServer nats_;
  std::unique_ptr<testing::PostgresServer> postgres_;
  int scratch_counter_ = 0;
};

/// Samples of one side of a scenario, in the scenario's unit.
using Sample = std::function<double()>;

/// Runs `repetitions` samples of each side, alternating which side goes first (ABBA), after one
/// unrecorded warm-up of each when `warm_up` is given. Returns {library runs, baseline runs}.
std::pair<std::vector<double>, std::vector<double>> interleave(int repetitions, const Sample& library,
                                                               const Sample& baseline,
                                                               const std::function<void()>& warm_up = {});

[[nodiscard]] double median(std::vector<double> values);
/// The q-quantile (0..1) by nearest rank.
[[nodiscard]] double quantile(std::vector<double> values, double q);
[[nodiscard]] nlohmann::json load_average();
[[nodiscard]] nlohmann::json machine_info();

/// A JSON object whose dump() is exactly `bytes` long (an order-like event, padded).
[[nodiscard]] nlohmann::json make_message(std::size_t bytes = 128, std::int64_t order_id = 1001);

/// CPU time (user + system, all threads) this process has used: the client side's cost,
/// which the server's work and other processes on the machine do not blur.
[[nodiscard]] double process_cpu_seconds();

/// One side's run: messages per second and client CPU microseconds per message.
struct Throughput {
  double rate = 0;
  double cpu_us_per_msg = 0;
};

using Seconds = std::chrono::duration<double>;
inline double elapsed_seconds(std::chrono::steady_clock::time_point since) {
  return Seconds(std::chrono::steady_clock::now() - since).count();
}

/// One scenario family: a name for --only, the scenario names it reports, and the code.
struct ScenarioGroup {
  std::string name;
  std::vector<std::string> scenarios;
  std::function<std::vector<Result>(Context&)> run;
};

std::vector<ScenarioGroup> publish_scenarios();
std::vector<ScenarioGroup> relay_scenarios();
std::vector<ScenarioGroup> consume_scenarios();
std::vector<ScenarioGroup> memory_scenarios();

}  // namespace natspubsub::bench
