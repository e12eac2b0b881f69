#include "child.hpp"

#include <fstream>
#include <iostream>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include <natspubsub/connection.hpp>
#include <natspubsub/log.hpp>

#include "consume.hpp"
#include "setup.hpp"

namespace natspubsub::bench {
namespace {

// A line of /proc/self/status in kB ("VmHWM:  12345 kB"), or -1.
long status_kb(const std::string& key) {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(key + ":", 0) == 0) return std::stol(line.substr(key.size() + 1));
  }
  return -1;
}

std::map<std::string, std::string> parse_flags(int argc, char** argv) {
  std::map<std::string, std::string> flags;
  for (int i = 2; i + 1 < argc; i += 2) {
    std::string key = argv[i];
    if (key.rfind("--", 0) != 0) throw std::invalid_argument("--child: expected a flag, got " + key);
    flags[key.substr(2)] = argv[i + 1];
  }
  return flags;
}

// Works through a backlog on a new durable, as the library's Consumer or as a raw pull loop,
// and reports the process's peak resident set size.
int consume_child(const std::map<std::string, std::string>& f) {
  const auto side = f.at("side");
  const auto url = f.at("url");
  const auto topic = f.at("topic");
  const auto durable = f.at("durable");
  const int count = std::stoi(f.at("count"));
  const ConsumeTuning t;
  Throughput result;
  if (side == "library") {
    Connection nats(bench_config(url));
    SubscriptionOptions o;
    o.durable = durable;
    o.concurrency = t.concurrency;
    o.prefetch = t.prefetch;
    o.fetch_timeout = kFetchExpiry;
    result = library_consume(nats, topic, count, o, [](const Message&) {});
  } else if (side == "raw") {
    RawNats raw(url);
    result = raw_consume(raw, f.at("stream"), bench_subject(topic), durable, count, t.raw_batch);
  } else {
    throw std::invalid_argument("--child consume: --side is library or raw");
  }
  nlohmann::json out = {{"side", side},
                        {"consumed", count},
                        {"rate", result.rate},
                        {"vm_hwm_kb", status_kb("VmHWM")},
                        {"vm_rss_kb", status_kb("VmRSS")}};
  std::cout << out.dump() << std::endl;
  return 0;
}

}  // namespace

int child_main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: natspubsub-bench --child consume --side library|raw --url URL --stream S --topic T "
                 "--durable D --count N\n";
    return 2;
  }
  natspubsub::logger()->set_level(spdlog::level::warn);
  const std::string mode = argv[1];
  const auto flags = parse_flags(argc, argv);
  if (mode == "consume") return consume_child(flags);
  std::cerr << "natspubsub-bench --child: unknown mode " << mode << "\n";
  return 2;
}

}  // namespace natspubsub::bench
