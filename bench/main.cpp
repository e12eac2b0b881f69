// natspubsub-bench: the library against hand-written cnats code. See BENCHMARKS.md.
//
//   natspubsub-bench                 every scenario at the issue's sizes, readable table
//   natspubsub-bench --quick --json  small counts, one JSON object per scenario per line
//   natspubsub-bench --only relay_sqlite,publish
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>

#include <nats/nats.h>

#include <natspubsub/log.hpp>
#include <natspubsub/version.hpp>

#include "bench.hpp"
#include "child.hpp"

namespace natspubsub::bench {
namespace {

constexpr const char* kUsage = R"(usage: natspubsub-bench [--quick] [--json] [--save FILE] [--only NAME[,NAME...]] [--repetitions N] [--list]

Starts its own nats-server (and PostgreSQL for the database scenarios) on 127.0.0.1, runs each
scenario with the library and with the equivalent raw cnats code, interleaved, and reports the
medians and the ratio library/baseline.

  --quick           small counts (seconds); the issue's sizes otherwise
  --json            one JSON object per scenario per line on stdout (progress goes to stderr)
  --save FILE       also write those JSON lines to FILE (with the table on stdout)
  --only LIST       only these scenario groups or scenarios (see --list)
  --repetitions N   repetitions per side (default 5, 3 for the slow scenarios)
  --list            print the scenario names and exit
)";

std::vector<ScenarioGroup> all_groups() {
  std::vector<ScenarioGroup> groups;
  for (auto&& list : {publish_scenarios(), consume_scenarios(), relay_scenarios(), memory_scenarios()})
    for (const auto& g : list) groups.push_back(g);
  return groups;
}

std::string fmt_number(double v, const std::string& unit) {
  char buf[64];
  if (unit == "msgs/s") {
    std::snprintf(buf, sizeof(buf), "%.0f", v);
    // Thousands separators for readability (built forwards: GCC 12 misreports insert()).
    const std::string digits = buf;
    std::string s;
    for (std::size_t i = 0; i < digits.size(); ++i) {
      if (i > 0 && (digits.size() - i) % 3 == 0) s += ',';
      s += digits[i];
    }
    return s;
  }
  std::snprintf(buf, sizeof(buf), v >= 100 ? "%.0f" : "%.1f", v);
  return buf;
}

std::string now_utc() {
  std::time_t t = std::time(nullptr);
  char buf[64];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

nlohmann::json to_json(const Result& r, const nlohmann::json& machine, bool quick) {
  nlohmann::json j = {{"scenario", r.scenario},
                      {"library", r.library},
                      {"baseline", r.baseline},
                      {"ratio", r.ratio()},
                      {"unit", r.unit},
                      {"target", r.target.describe()},
                      {"met", r.met()},
                      {"repetitions", r.library_runs.size()},
                      {"library_runs", r.library_runs},
                      {"baseline_runs", r.baseline_runs},
                      {"description", r.description},
                      {"quick", quick},
                      {"load_avg", r.load_avg},
                      {"machine", machine}};
  // Ratio of each repetition's pair (run back to back), then the median: less sensitive than the
  // ratio of medians to load that changes during the run.
  std::vector<double> paired;
  for (std::size_t i = 0; i < std::min(r.library_runs.size(), r.baseline_runs.size()); ++i)
    if (r.baseline_runs[i] != 0) paired.push_back(r.library_runs[i] / r.baseline_runs[i]);
  j["paired_ratio_median"] = median(paired);
  for (const auto& [k, v] : r.extra.items()) j[k] = v;
  return j;
}

void print_table(const std::vector<Result>& results, const nlohmann::json& machine, const nlohmann::json& load_start,
                 const nlohmann::json& load_end, double seconds, bool quick) {
  std::ostringstream out;
  out << "natspubsub-bench " << natspubsub::version() << (quick ? " (--quick: small counts)" : "") << ", "
      << now_utc() << "\n"
      << "machine: " << machine["cpu"].get<std::string>() << ", " << machine["nproc"] << " cores, "
      << machine["ram_mb"] << " MB RAM; cnats " << nats_GetVersion() << "\n"
      << "load average at start " << load_start.dump() << ", at end " << load_end.dump() << "; run took "
      << static_cast<int>(seconds) << " s\n\n";
  char line[256];
  std::snprintf(line, sizeof(line), "%-24s %12s %12s %-7s %7s  %-16s %-4s %s\n", "scenario", "library", "baseline",
                "unit", "ratio", "target", "met", "runs");
  out << line;
  for (const auto& r : results) {
    std::snprintf(line, sizeof(line), "%-24s %12s %12s %-7s %7.2f  %-16s %-4s %zu\n", r.scenario.c_str(),
                  fmt_number(r.library, r.unit).c_str(), fmt_number(r.baseline, r.unit).c_str(), r.unit.c_str(),
                  r.ratio(), r.target.describe().c_str(), r.met() ? "yes" : "NO", r.library_runs.size());
    out << line;
  }
  out << "\nlibrary and baseline: medians of `runs` runs per side, interleaved (ABBA), same servers;\n"
      << "ratio = library / baseline; msgs/s: higher is better, us and MB: lower is better\n";
  std::cout << out.str() << std::flush;
}

int run(int argc, char** argv) {
  bool quick = false;
  bool json = false;
  bool list = false;
  int repetitions = 0;
  std::string save;
  std::set<std::string> only;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    if (a == "--quick") quick = true;
    else if (a == "--json") json = true;
    else if (a == "--list") list = true;
    else if (a == "--repetitions") repetitions = std::stoi(value());
    else if (a == "--save") save = value();
    else if (a == "--only") {
      std::stringstream names(value());
      for (std::string n; std::getline(names, n, ',');)
        if (!n.empty()) only.insert(n);
    } else if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      return 0;
    } else {
      std::cerr << "natspubsub-bench: unknown argument " << a << "\n" << kUsage;
      return 2;
    }
  }
  auto groups = all_groups();
  if (list) {
    for (const auto& g : groups)
      for (const auto& s : g.scenarios) std::cout << s << "\n";
    return 0;
  }
  auto settings = quick ? Settings::quick_run() : Settings::full();
  if (repetitions > 0) settings.repetitions = settings.slow_repetitions = repetitions;

  // The library's own lines (relay start, reconnects) would interleave with our output.
  natspubsub::logger()->set_level(spdlog::level::warn);
  const auto machine = machine_info();
  const auto load_start = load_average();
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<Result> results;
  std::ofstream saved;
  if (!save.empty()) {
    saved.open(save, std::ios::trunc);
    if (!saved) throw std::runtime_error("cannot write " + save);
  }
  {
    Context ctx(settings);
    for (const auto& g : groups) {
      bool selected = only.empty() || only.count(g.name) > 0;
      for (const auto& s : g.scenarios) selected = selected || only.count(s) > 0;
      if (!selected) continue;
      std::cerr << "natspubsub-bench: " << g.name << " ..." << std::endl;
      const auto tg = std::chrono::steady_clock::now();
      for (auto& r : g.run(ctx)) {
        r.library = median(r.library_runs);
        r.baseline = median(r.baseline_runs);
        const auto line = to_json(r, machine, quick).dump();
        if (json) std::cout << line << std::endl;
        if (saved.is_open()) saved << line << std::endl;
        results.push_back(std::move(r));
      }
      std::cerr << "natspubsub-bench: " << g.name << " done in " << static_cast<int>(elapsed_seconds(tg)) << " s"
                << std::endl;
    }
  }
  if (!json) print_table(results, machine, load_start, load_average(), elapsed_seconds(t0), quick);
  return 0;
}

}  // namespace
}  // namespace natspubsub::bench

int main(int argc, char** argv) {
  try {
    if (argc > 1 && std::strcmp(argv[1], "--child") == 0) return natspubsub::bench::child_main(argc - 1, argv + 1);
    return natspubsub::bench::run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "natspubsub-bench: " << e.what() << std::endl;
    return 1;
  }
}
