#pragma once
// The names and configuration every scenario shares: app "bench" in env "bench", whose events
// stream "bench-bench-events" (file storage, R1, 2 min duplicate window) holds both sides' messages.
#include <string>

#include <natspubsub/config.hpp>
#include <natspubsub/connection.hpp>
#include <natspubsub/topology.hpp>

namespace natspubsub::bench {

inline Config bench_config(const std::string& url) {
  auto c = Config::development("bench");
  c.env = "bench";
  c.servers = {url};
  return c;
}

/// Ensures the events stream (the library's own topology code) and returns its name.
inline std::string ensure_bench_stream(Connection& nats) { return Topology(nats).ensure_events_stream().stream; }

inline std::string bench_subject(const std::string& topic) { return "bench.bench." + topic; }

}  // namespace natspubsub::bench
