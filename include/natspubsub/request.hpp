#pragma once
// Request-reply over core NATS: one service asks, another answers, with a timeout.
//
// The inventory service answers on "{env}.inventory.stock.check"; its replicas share the load in
// one queue group:
//
//   natspubsub::Responder stock(nats, "stock.check", [&](const natspubsub::Request& r) {
//     auto sku = r.data().at("sku").get<std::string>();
//     return nlohmann::json{{"sku", sku}, {"available", inventory.count(sku)}};
//   });
//
// The order service asks:
//
//   auto reply = natspubsub::request(nats, "stock.check", {{"sku", "A-1"}},
//                                    {.timeout = natspubsub::Millis{500}, .app = "inventory"});
//   int available = reply.data.at("available");
//
// On the wire the request body is an envelope (the same format as events: event_id is the
// message id, occurred_at the timestamp) with headers `correlation-id` and `topic`. The reply
// body is
//   {"success": true,  "data": <handler result>, "messageId": "<request's id>", "timestamp": "…"}
//   {"success": false, "error": "<text>",       "messageId": "<request's id>", "timestamp": "…"}
// and an error reply also carries the NATS service API headers `Nats-Service-Error` and
// `Nats-Service-Error-Code` (500 handler failed, 503 unavailable, 400 unreadable request, or the
// code of a RemoteError the handler threw).
//
// The caller tells the outcomes apart by type: TimeoutError (nobody answered in time),
// NoRespondersError (nobody listens on the subject), RemoteError (a responder answered with an
// error; code() and remote_message()).
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include <natspubsub/circuit_breaker.hpp>
#include <natspubsub/config.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/publisher.hpp>

namespace natspubsub {

class Connection;

/// The header carrying the correlation id on requests and replies.
inline constexpr const char* kCorrelationIdHeader = "correlation-id";

/// Makes `id` the correlation id of requests made on this thread until destroyed (then restores
/// the previous one). A Responder sets it around its handler, and the Consumer around each
/// handler call (the message's `correlation-id` header, else its event id), so a request made
/// while handling one carries the same id.
///
///   natspubsub::CorrelationScope scope(order.correlation_id);
///   natspubsub::request(nats, "stock.check", ...);   // sends correlation-id: <order's>
class CorrelationScope {
 public:
  explicit CorrelationScope(std::string id);
  ~CorrelationScope();
  CorrelationScope(const CorrelationScope&) = delete;
  CorrelationScope& operator=(const CorrelationScope&) = delete;

 private:
  std::optional<std::string> previous_;
};

/// The correlation id of the request or message being handled on this thread, if any.
[[nodiscard]] std::optional<std::string> current_correlation_id();

/// Designated-initializer friendly: `{.timeout = Millis{500}, .app = "inventory"}`.
struct RequestOptions {
  Millis timeout{5000};                   ///< per attempt (> 0)
  /// Only an idempotent request may be sent more than once: set it to allow `retries`.
  bool idempotent = false;
  /// Further attempts after a timeout, no responders, or a 503 (unavailable) reply. Every
  /// attempt carries the same message id. ConfigError unless `idempotent`.
  int retries = 0;
  Millis retry_delay{200};                ///< wait before each further attempt
  std::optional<std::string> app{};       ///< the answering app: subject {env}.{app}.{topic}; default this app
  std::optional<std::string> subject{};   ///< a full subject instead
  std::optional<std::string> message_id{};      ///< default: a new UUID
  /// Default: the correlation id of the request or consumer message being handled on this thread
  /// (CorrelationScope), else the trace id of the current trace (current_trace()), else the
  /// message id.
  std::optional<std::string> correlation_id{};
  std::optional<std::string> message_type{};
  std::optional<std::string> traceparent{};     ///< W3C trace context; default the current trace's, if any
  Headers headers{};                            ///< extra headers
};

/// A successful answer.
struct Reply {
  nlohmann::json data;              ///< what the responder's handler returned
  std::string message_id;           ///< the request's message id, echoed by the responder
  std::string correlation_id;
  SystemTime timestamp{};           ///< when the responder answered
  std::string subject;              ///< where the request went
  Headers headers;                  ///< the reply's headers
  int attempts = 1;                 ///< attempts it took (> 1 only with retries)
};

/// Sends `message` as a request on topic `topic` of options.app (default: this app) or on
/// options.subject, and waits for the answer. Throws TimeoutError, NoRespondersError,
/// RemoteError (the responder answered with an error), EnvelopeError (the answer is not a reply
/// in the format above), ConnectionError, SubjectError or ConfigError (bad options).
[[nodiscard]] Reply request(Connection& connection, std::string_view topic, const nlohmann::json& message,
                            const RequestOptions& options = {});

/// What a responder's handler receives.
struct Request {
  Envelope envelope;                ///< event_id is the message id, occurred_at the time it was sent
  std::string subject;
  Headers headers;
  std::string correlation_id;       ///< from the header; else the message id
  [[nodiscard]] const std::string& message_id() const noexcept { return envelope.event_id; }
  [[nodiscard]] const nlohmann::json& data() const noexcept { return envelope.message; }
  /// A header value; empty when absent.
  [[nodiscard]] std::string header(std::string_view name) const;
};

/// Returns the reply data. Throwing answers the caller with an error reply (the exception's
/// what() as the text; the code of a RemoteError, else 500): a request is never left unanswered.
using RequestHandler = std::function<nlohmann::json(const Request&)>;

struct ResponderOptions {
  std::optional<std::string> subject{};      ///< a full subject; default {env}.{app}.{topic}
  std::optional<std::string> queue_group{};  ///< default "{env}-{app}": every replica of the app shares the load
  /// Requests handled at once by this instance (one queue subscription each) (>= 1).
  int concurrency = 1;
  /// Opens after repeated handler failures; while open, requests get a 503 "unavailable" reply at
  /// once without running the handler. A RemoteError with a 4xx code is the caller's fault and
  /// does not count. May be shared with other responders or calls to the same dependency.
  std::shared_ptr<CircuitBreaker> circuit_breaker{};
  std::string name{};                         ///< endpoint name in the NATS service API; default the topic
  std::map<std::string, std::string> metadata{};  ///< endpoint metadata in the NATS service API
};

struct ResponderStats {
  std::string name;
  std::string subject;
  std::string queue_group;
  uint64_t requests = 0;        ///< requests received
  uint64_t errors = 0;          ///< answered with an error (handler failed, unreadable, unavailable)
  uint64_t rejected = 0;        ///< answered 503 because the circuit was open (also in errors)
  uint64_t malformed = 0;       ///< requests that were no envelope (also in errors)
  uint64_t unanswerable = 0;    ///< messages without a reply subject (plain publishes): handled, not answered
  std::string last_error;
  std::chrono::nanoseconds processing_time{0};  ///< total time spent answering
  std::optional<CircuitBreakerStats> circuit;

  [[nodiscard]] nlohmann::json to_json() const;
};

/// Answers requests on a subject until stopped. Borrows the Connection, which must outlive it.
class Responder {
 public:
  /// Subscribes at once (queue group, `concurrency` subscriptions). Throws SubjectError,
  /// ConfigError or NatsError.
  Responder(Connection& connection, std::string_view topic, RequestHandler handler, ResponderOptions options = {});
  /// stop() with the default timeout.
  ~Responder();
  Responder(const Responder&) = delete;
  Responder& operator=(const Responder&) = delete;

  /// Graceful: stops taking new requests (the server sends them to the other replicas), answers
  /// every request already received, then returns; bounded by `timeout`, after which requests
  /// not yet handled are dropped (their callers time out). Safe to call twice.
  void stop(Millis timeout = Millis{10000});

  [[nodiscard]] ResponderStats stats() const;
  /// A function reading this responder's stats that stays valid after the Responder is gone
  /// (for Service).
  [[nodiscard]] std::function<ResponderStats()> stats_source() const;
  [[nodiscard]] const std::string& subject() const noexcept;
  [[nodiscard]] const std::string& queue_group() const noexcept;
  [[nodiscard]] const std::string& name() const noexcept;
  [[nodiscard]] const std::map<std::string, std::string>& metadata() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace natspubsub
