// ctest-labels: bench
// natspubsub-bench --quick runs every scenario and prints well-formed results. Not a timed test:
// the numbers are not checked against the targets, only their shape and arithmetic.
#include <chrono>
#include <cmath>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include "support/servers.hpp"

namespace {

#ifdef NATSPUBSUB_BENCH_EXE
const std::string kBench = NATSPUBSUB_BENCH_EXE;
#else
const std::string kBench = NATSPUBSUB_BINARY_DIR "/bench/natspubsub-bench";
#endif

// The scenarios: the bench may add more, never fewer.
const std::vector<std::string> kRequired = {
    "publish_sync",      "publish_batch",          "consume",          "relay_sqlite",
    "relay_postgres",    "consume_inbox_sqlite",   "consume_inbox_postgres",
    "e2e_latency_p50",   "e2e_latency_p99",        "memory_peak_rss",
};

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) out.push_back(line);
  return out;
}

}  // namespace

TEST_CASE("--list names every scenario the issue asks for") {
  auto r = natspubsub::testing::run_command(kBench + " --list", std::chrono::seconds(10));
  REQUIRE(r.status == 0);
  auto names = lines_of(r.output);
  std::set<std::string> listed(names.begin(), names.end());
  CHECK(listed.size() == names.size());
  for (const auto& s : kRequired) CHECK_MESSAGE(listed.count(s) == 1, s);
}

TEST_CASE("--quick --json: one well-formed object per scenario, ratio = library / baseline") {
  auto list = natspubsub::testing::run_command(kBench + " --list", std::chrono::seconds(10));
  REQUIRE(list.status == 0);
  const auto expected = lines_of(list.output);

  const auto started = std::chrono::steady_clock::now();
  auto r = natspubsub::testing::run_command(kBench + " --quick --json", std::chrono::seconds(150));
  const auto took = std::chrono::steady_clock::now() - started;
  INFO("stderr: " << r.error);
  REQUIRE(r.status == 0);
  CHECK(took < std::chrono::seconds(150));  // seconds per scenario, also under ASan on 2 busy cores

  std::map<std::string, int> seen;
  for (const auto& line : lines_of(r.output)) {
    INFO("line: " << line);
    nlohmann::json j;
    REQUIRE_NOTHROW(j = nlohmann::json::parse(line));
    REQUIRE(j.is_object());
    REQUIRE(j["scenario"].is_string());
    REQUIRE(j["library"].is_number());
    REQUIRE(j["baseline"].is_number());
    REQUIRE(j["ratio"].is_number());
    REQUIRE(j["unit"].is_string());
    REQUIRE(j["target"].is_string());
    REQUIRE(j["met"].is_boolean());
    REQUIRE(j["repetitions"].is_number_integer());
    REQUIRE(j["library_runs"].is_array());
    REQUIRE(j["baseline_runs"].is_array());
    REQUIRE(j["load_avg"].is_array());
    REQUIRE(j["machine"].is_object());
    CHECK(j["quick"] == true);

    const std::string unit = j["unit"];
    CHECK((unit == "msgs/s" || unit == "us" || unit == "MB"));
    const double library = j["library"];
    const double baseline = j["baseline"];
    const double ratio = j["ratio"];
    CHECK(library > 0);
    CHECK(baseline > 0);
    CHECK(std::isfinite(ratio));
    CHECK(ratio == doctest::Approx(library / baseline).epsilon(1e-9));
    CHECK(j["repetitions"].get<int>() >= 1);
    CHECK(j["library_runs"].size() == j["repetitions"].get<std::size_t>());
    seen[j["scenario"]]++;
  }
  for (const auto& s : expected) CHECK_MESSAGE(seen[s] == 1, s);
  CHECK(seen.size() == expected.size());
}
