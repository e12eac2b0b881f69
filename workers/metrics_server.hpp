#pragma once
// The relay's HTTP endpoint, on CivetWeb (the server prometheus-cpp's exposer uses) with
// prometheus-cpp's text serializer:
//   GET|HEAD /metrics  every registered collectable, Prometheus text format 0.0.4
//   GET|HEAD /livez    200 "ok" while the process serves requests (never looks at NATS or the database)
//   GET|HEAD /readyz   200 when `readiness` passes, else 503; JSON body of the HealthReport
//   GET|HEAD /healthz  the same as /readyz (kept for older probes)
//
//   MetricsServer server(parse_listen_address(":9464"), [&] { return health.readiness(); });
//   server.add_collectable(relay_metrics);
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <prometheus/collectable.h>

#include <natspubsub/service.hpp>

class CivetServer;
class CivetHandler;

namespace natspubsub::workers {

/// CivetWeb's `listening_ports` value for a --metrics-addr:
///   ":PORT"        all IPv4 interfaces, and all IPv6 ones when CivetWeb has IPv6 ("+PORT")
///   "0.0.0.0:PORT", "127.0.0.1:PORT"   that IPv4 address ("localhost" means 127.0.0.1)
///   "[::]:PORT", "[::1]:PORT"          that IPv6 address (refused when CivetWeb has no IPv6,
///                                      as Debian 12's 1.15 has not)
/// PORT is 1..65535. Throws std::invalid_argument naming what is wrong.
[[nodiscard]] std::string parse_listen_address(const std::string& address);

class MetricsServer {
 public:
  using Readiness = std::function<HealthReport()>;
  /// Listens at once; throws std::runtime_error when the port cannot be bound.
  MetricsServer(const std::string& listening_ports, Readiness readiness);
  ~MetricsServer();
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  void add_collectable(std::shared_ptr<prometheus::Collectable> collectable);
  /// The ports listened on (one per listening socket).
  [[nodiscard]] std::vector<int> ports() const;

  /// The text /metrics serves (also for tests).
  [[nodiscard]] std::string scrape() const;

 private:
  Readiness readiness_;
  mutable std::mutex mutex_;
  std::vector<std::shared_ptr<prometheus::Collectable>> collectables_;
  std::vector<std::unique_ptr<CivetHandler>> handlers_;
  std::unique_ptr<CivetServer> server_;  // last: stopped (threads joined) before the rest goes
};

}  // namespace natspubsub::workers
