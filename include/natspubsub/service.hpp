#pragma once
// Discovery and health for any process built on the library.
//
// Service answers the NATS service API (ADR-32) on plain subscriptions, so standard tooling
// (`nats micro ls`, `nats micro info`, `nats micro stats`) lists the process:
//   $SRV.PING, $SRV.PING.<name>, $SRV.PING.<name>.<id>    -> io.nats.micro.v1.ping_response
//   $SRV.INFO, $SRV.INFO.<name>, $SRV.INFO.<name>.<id>    -> io.nats.micro.v1.info_response
//   $SRV.STATS, $SRV.STATS.<name>, $SRV.STATS.<name>.<id> -> io.nats.micro.v1.stats_response
// Its endpoints are the responders and consumer subscriptions you add; STATS carries their
// counters (a subscription's full statistics are in the endpoint's "data").
//
//   natspubsub::Service service(nats, {.name = "inventory", .version = "1.4.0",
//                                      .description = "stock levels"});
//   service.add(stock_responder);                 // a Responder
//   service.add(consumer);                        // a Consumer: one endpoint per subscription
//   service.add_endpoints([&] { return my_endpoints(); });   // anything else (a relay, ...)
//
// Health answers "is this process alive" and "may it take traffic":
//
//   natspubsub::Health health(nats);
//   health.add_check("database", [&] { db->ping(); });   // throws when the database is down
//   auto ready = health.readiness();                      // NATS connected, JetStream, database
//   reply(ready.ok ? 200 : 503, ready.to_json().dump());
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <natspubsub/config.hpp>
#include <natspubsub/envelope.hpp>

namespace natspubsub {

class Connection;
class Consumer;
class Responder;
struct SubscriptionStats;

/// One endpoint as the NATS service API shows it (INFO uses name, subject, queue_group and
/// metadata; STATS the rest too).
struct ServiceEndpoint {
  std::string name;
  std::string subject;
  std::string queue_group;
  std::map<std::string, std::string> metadata;
  uint64_t num_requests = 0;
  uint64_t num_errors = 0;
  std::string last_error;                         ///< empty when there was none
  std::chrono::nanoseconds processing_time{0};    ///< total
  nlohmann::json data;                            ///< free-form; omitted from STATS when null
};

/// Returns the endpoints it knows about, read at the moment of an INFO or STATS request. Called
/// from a cnats callback thread: keep it quick; an exception is logged and the source skipped.
using EndpointSource = std::function<std::vector<ServiceEndpoint>()>;

struct ServiceOptions {
  std::string name{};          ///< [A-Za-z0-9_-]+: the kind of service, shared by its replicas
  std::string version{};       ///< SemVer, e.g. "1.4.0"
  std::string description{};
  std::map<std::string, std::string> metadata{};
  std::string id{};            ///< this instance; default a random 22-character id

  /// Throws ConfigError("service.<field>", rule).
  void validate() const;
};

/// Answers $SRV.PING / INFO / STATS for one service instance until stopped. Borrows the
/// Connection (which must outlive it); endpoints may be added while it runs. Thread-safe.
class Service {
 public:
  /// Validates the options and subscribes. Throws ConfigError or NatsError.
  Service(Connection& connection, ServiceOptions options);
  ~Service();  ///< stop()
  Service(const Service&) = delete;
  Service& operator=(const Service&) = delete;

  /// The responder's endpoint, read through Responder::stats_source(): safe even after the
  /// Responder is gone (its last counters stay).
  Service& add(const Responder& responder);
  /// The consumer's subscriptions, one endpoint each: name = durable, subject = filter,
  /// queue_group = durable (instances sharing a durable split its messages as a queue group
  /// does), num_requests = messages fetched, num_errors = handler failures, processing_time =
  /// handler time, data = subscription_json(stats) (retries, DLQ, circuit, rate limit, ...).
  /// Borrowed: the Consumer must outlive the Service (stop the Service first).
  Service& add(const Consumer& consumer);
  /// Endpoints from anywhere else: a consumer's subscriptions, the outbox relay, ...
  Service& add_endpoints(EndpointSource source);

  /// The response bodies, as sent (also handy for an HTTP endpoint).
  [[nodiscard]] nlohmann::json ping() const;
  [[nodiscard]] nlohmann::json info() const;
  [[nodiscard]] nlohmann::json stats() const;

  [[nodiscard]] const std::string& name() const noexcept;
  [[nodiscard]] const std::string& id() const noexcept;

  /// Unsubscribes (drained: discovery requests already received are answered). Safe to call twice.
  void stop(Millis timeout = Millis{2000});

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// A subscription's statistics as JSON (every counter, latency in microseconds, circuit and
/// rate limit when set): the "data" of its endpoint in STATS.
[[nodiscard]] nlohmann::json subscription_json(const SubscriptionStats& stats);

/// The outcome of one health check.
struct HealthCheck {
  std::string name;
  bool ok = false;
  std::string detail;                 ///< why not, or a short state ("connected")
  std::chrono::milliseconds took{0};
};

struct HealthReport {
  bool ok = false;                    ///< every check passed
  std::vector<HealthCheck> checks;
  SystemTime checked_at{};

  /// {"status":"ok"|"unavailable","checked_at":"…","checks":{"nats":{"ok":true,"detail":"…","took_ms":0},…}}
  [[nodiscard]] nlohmann::json to_json() const;
};

/// Liveness and readiness of a process. Borrows the Connection. Thread-safe.
class Health {
 public:
  using Check = std::function<void()>;  ///< throws (anything) when unhealthy; what() is the detail

  explicit Health(const Connection& connection);

  /// Adds a readiness check (a database ping, a downstream service, ...). Run in the calling
  /// thread of readiness(): keep it bounded (a query timeout, a request timeout).
  Health& add_check(std::string name, Check check);

  /// Alive: the NATS connection is not closed for good (connected, or reconnecting on its own).
  /// A failed liveness probe means "restart me".
  [[nodiscard]] HealthReport liveness() const;
  /// Ready: NATS connected, JetStream answering (bounded by the connection's jetstream_timeout),
  /// and every added check passing. A failed readiness probe means "send me no traffic now".
  [[nodiscard]] HealthReport readiness() const;

 private:
  const Connection* connection_;
  mutable std::mutex mutex_;
  std::vector<std::pair<std::string, Check>> checks_;
};

}  // namespace natspubsub
