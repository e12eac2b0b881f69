#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "bench.hpp"

namespace natspubsub::bench {

Settings Settings::full() { return Settings{}; }

Settings Settings::quick_run() {
  Settings s;
  s.quick = true;
  s.repetitions = 3;
  s.slow_repetitions = 3;
  s.publish_sync_count = 200;
  s.publish_batch_count = 2000;
  s.relay_rows = 1500;
  s.consume_count = 1500;
  s.inbox_count = 200;
  s.latency_seconds = 1;
  s.memory_backlog = 10000;
  s.memory_small_backlog = 2000;
  return s;
}

std::string Target::describe() const {
  std::ostringstream out;
  out.precision(3);
  switch (kind) {
    case Kind::none: return "report";
    case Kind::ratio_at_least: out << "ratio >= " << value; break;
    case Kind::ratio_at_most: out << "ratio <= " << value; break;
    case Kind::library_at_most: out << "library < " << value; break;
  }
  return out.str();
}

bool Result::met() const {
  bool ok = true;
  switch (target.kind) {
    case Target::Kind::none: break;
    case Target::Kind::ratio_at_least: ok = ratio() >= target.value; break;
    case Target::Kind::ratio_at_most: ok = ratio() <= target.value; break;
    case Target::Kind::library_at_most: ok = library < target.value; break;
  }
  return ok && extra_met.value_or(true);
}

Context::Context(Settings settings) : settings_(settings), scratch_("natspubsub-bench") {}

Context::~Context() = default;

testing::PostgresServer& Context::postgres() {
  if (!postgres_) postgres_ = std::make_unique<testing::PostgresServer>();
  return *postgres_;
}

std::string Context::scratch_path(const std::string& name) {
  auto dir = scratch_.path() / (std::to_string(++scratch_counter_) + "-" + name);
  std::filesystem::create_directories(dir);
  return dir.string();
}

std::string Context::self_exe() { return std::filesystem::read_symlink("/proc/self/exe").string(); }

std::pair<std::vector<double>, std::vector<double>> interleave(int repetitions, const Sample& library,
                                                               const Sample& baseline,
                                                               const std::function<void()>& warm_up) {
  if (warm_up) warm_up();
  std::vector<double> lib;
  std::vector<double> base;
  for (int r = 0; r < repetitions; ++r) {
    // ABBA: a drift in machine load (other builds, the stream growing) hits both sides alike.
    if (r % 2 == 0) {
      lib.push_back(library());
      base.push_back(baseline());
    } else {
      base.push_back(baseline());
      lib.push_back(library());
    }
  }
  return {lib, base};
}

double process_cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

double median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  auto n = values.size();
  return n % 2 == 1 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
}

double quantile(std::vector<double> values, double q) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  auto rank = static_cast<std::size_t>(std::ceil(q * static_cast<double>(values.size())));
  return values[std::clamp<std::size_t>(rank, 1, values.size()) - 1];
}

nlohmann::json load_average() {
  std::ifstream in("/proc/loadavg");
  double a = 0, b = 0, c = 0;
  in >> a >> b >> c;
  return nlohmann::json::array({a, b, c});
}

nlohmann::json machine_info() {
  std::string cpu = "unknown";
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);) {
    if (line.rfind("model name", 0) == 0) {
      auto colon = line.find(':');
      if (colon != std::string::npos) cpu = line.substr(line.find_first_not_of(' ', colon + 1));
      break;
    }
  }
  long mem_kb = 0;
  std::ifstream meminfo("/proc/meminfo");
  for (std::string key; meminfo >> key;) {
    if (key == "MemTotal:") {
      meminfo >> mem_kb;
      break;
    }
    meminfo.ignore(4096, '\n');
  }
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  return {{"nproc", std::thread::hardware_concurrency()},
          {"cpu", cpu},
          {"ram_mb", mem_kb / 1024},
          {"host", host}};
}

nlohmann::json make_message(std::size_t bytes, std::int64_t order_id) {
  nlohmann::json m = {{"order_id", order_id},
                      {"customer_id", "cust-000042"},
                      {"amount_cents", 2599},
                      {"currency", "EUR"},
                      {"sku", "SKU-123-XL"},
                      {"pad", ""}};
  const auto base = m.dump().size();
  if (base > bytes) throw std::logic_error("make_message: " + std::to_string(bytes) + " bytes is too small");
  m["pad"] = std::string(bytes - base, 'x');
  return m;
}

}  // namespace natspubsub::bench
