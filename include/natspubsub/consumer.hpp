#pragma once
// The consumer runtime: one handler per topic, and the runtime does the rest: load sharing
// across instances (one durable pull consumer per subscription), bounded concurrency, retries
// with backoff, a dead-letter queue, and a stop that hands unfinished work back at once.
//
//   natspubsub::Connection nats(config);
//   natspubsub::Consumer consumer(nats);
//   consumer.use(natspubsub::middleware::trace_context());
//   consumer.subscribe("order.created", [](const natspubsub::Message& m) {
//     charge(m.envelope.message.at("order_id"));        // throw to retry, PermanentError for the DLQ
//   }, {.concurrency = 8, .max_attempts = 5,
//       .backoff = natspubsub::Backoff::exponential(natspubsub::Millis{1000}, natspubsub::Millis{60000})});
//   consumer.subscribe_subject("production.payments.payment.settled", on_payment);  // another app's
//   consumer.start();
//   ...
//   consumer.stop(natspubsub::Millis{20000});   // on SIGTERM
//
// Per message: decode the envelope (a body that is not one goes to the DLQ as `malformed`), run
// the middleware chain and the handler on a worker, then ack on success; on failure ask the
// error policy: retry (NAK with the backoff delay for this delivery count), dead-letter (DLQ
// publish, wait for the PubAck, then TERM), or discard (ack and log). A failure on the last
// allowed attempt dead-letters. Long handlers keep their message with in-progress signals.
//
// Attempts are the server's delivery count (less this process's circuit-breaker deferrals). A
// delivery past max_attempts is dead-lettered as `max_deliveries` before the handler runs: no
// earlier delivery got a verdict (a crash loop: the handler killed the process; a handler hung
// past ack_wait), so the handler runs at most max_attempts times per message.
// DLQ outage: if the DLQ does not acknowledge a letter, the message is NAKed with the backoff
// delay and stays pending on its durable; each redelivery publishes the letter again (in the same
// process without running the handler; in another process or after a restart the handler runs
// again while the delivery count allows, then the count sends it to the DLQ). MaxDeliver is
// unlimited by default, so this lasts as long as the outage. Test: tests/dlq_outage_test.cpp.
//
// A dead letter replayed with natspubsub-dlq comes back to the subscription that failed on it
// (and to no other consumer of the subject) through its replay route, see
// ConsumerOptions::replay_route.
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <natspubsub/backoff.hpp>
#include <natspubsub/circuit_breaker.hpp>
#include <natspubsub/config.hpp>
#include <natspubsub/message.hpp>
#include <natspubsub/middleware.hpp>
#include <natspubsub/rate_limiter.hpp>
#include <natspubsub/stats.hpp>

namespace natspubsub {

class Connection;

using Handler = std::function<void(const Message&)>;

/// What to do with a message whose handler failed.
enum class Verdict {
  retry,        ///< NAK with the backoff delay (the DLQ once attempts are used up)
  dead_letter,  ///< to the DLQ now
  discard,      ///< ack and log: the message is dropped on purpose
};
[[nodiscard]] const char* to_string(Verdict verdict) noexcept;

/// A handler (or middleware) failure.
struct HandlerFailure {
  std::exception_ptr exception;
  std::string error_class;    ///< demangled type name ("std::runtime_error", "int", ...)
  std::string message;        ///< what() for std::exception, else a description
};

/// Decides a failure's verdict. Rules run in the order added; the first that returns a verdict
/// wins. Without a match: PermanentError (and types derived from it) -> dead_letter, anything
/// else -> retry.
///
///   natspubsub::ErrorPolicy policy;
///   policy.dead_letter_on<std::invalid_argument>()
///         .discard_on<DuplicateOrder>()
///         .add_rule([](const natspubsub::HandlerFailure& f, const natspubsub::Message& m)
///                       -> std::optional<natspubsub::Verdict> {
///           if (m.header("x-test") == "1") return natspubsub::Verdict::discard;
///           return std::nullopt;
///         });
class ErrorPolicy {
 public:
  using Rule = std::function<std::optional<Verdict>(const HandlerFailure&, const Message&)>;

  ErrorPolicy& add_rule(Rule rule);
  template <typename E>
  ErrorPolicy& dead_letter_on() { return add_rule(on_type<E>(Verdict::dead_letter)); }
  template <typename E>
  ErrorPolicy& discard_on() { return add_rule(on_type<E>(Verdict::discard)); }
  template <typename E>
  ErrorPolicy& retry_on() { return add_rule(on_type<E>(Verdict::retry)); }

  /// The verdict for `failure`. A rule that throws is skipped (and logged).
  [[nodiscard]] Verdict decide(const HandlerFailure& failure, const Message& message) const;

  /// A rule matching exceptions of type E (or derived from it).
  template <typename E>
  [[nodiscard]] static Rule on_type(Verdict verdict) {
    return [verdict](const HandlerFailure& f, const Message&) -> std::optional<Verdict> {
      if (!f.exception) return std::nullopt;
      try {
        std::rethrow_exception(f.exception);
      } catch (const E&) {
        return verdict;
      } catch (...) {
      }
      return std::nullopt;
    };
  }

 private:
  std::vector<Rule> rules_;
};

/// Per-subscription settings; an empty field takes the Config's consumer default.
/// Usable with designated initializers: `{.concurrency = 8, .max_attempts = 5}`.
struct SubscriptionOptions {
  std::optional<std::string> durable{};      ///< default Topology::consumer_name(): "{env}-{app}-{filter made safe}",
                                             ///< in the natspubsub topology mode NatsPubsub's "{app}_{filter, '_' for . * >}"
  std::optional<int> concurrency{};          ///< handlers running at once (workers)
  /// Messages fetched ahead of free workers (default 0: a fetch never asks for more than the free
  /// workers). A prefetched message waits, kept alive with in-progress signals, and is handed back
  /// at once on stop.
  std::optional<int> prefetch{};
  std::optional<int> max_attempts{};         ///< handler attempts before the DLQ
  std::optional<Backoff> backoff{};          ///< default: Backoff::list(config.consumer.backoff)
  std::optional<Millis> ack_wait{};
  std::optional<int> max_ack_pending{};      ///< must be >= concurrency + prefetch
  /// The server's MaxDeliver: -1 (unlimited, the default; an existing durable is updated to it in
  /// place) or more than max_attempts. The runtime counts attempts itself; a finite value lets the
  /// server stop delivering a message whose dead letter the DLQ refused, after which only its
  /// once-only MAX_DELIVERIES advisory (ConsumerOptions::capture_max_deliveries) can still
  /// dead-letter it, trying for about 3 s.
  std::optional<int64_t> max_deliver{};
  std::optional<Millis> in_progress_interval{};  ///< +WPI period; default ack_wait / 3
  /// How long in-progress signals keep one message alive (from its fetch). After that the server
  /// redelivers it when ack_wait passes: a hung handler does not hold a message forever.
  std::optional<Millis> max_in_progress{};   ///< default 10 minutes
  std::optional<Millis> fetch_timeout{};     ///< how long one pull waits; bounds stop() latency
  ErrorPolicy error_policy{};
  std::vector<Middleware> middleware{};      ///< runs inside the consumer-wide chain

  // ---- protection (circuit_breaker.hpp, rate_limiter.hpp) ----
  /// Opens after repeated handler failures (a dependency is down). While it is open the
  /// subscription fetches nothing and NAKs what it holds with the time left until the next
  /// probe; while half-open it fetches only probes. A failure that opens it, or happens while
  /// it is not closed, is not counted as an attempt: the message waits instead of going to the
  /// DLQ (such deferrals count in stats().deferred). Failures the error policy sends to the DLQ
  /// or discards are the message's fault and never open it. Message::attempt() stays the
  /// server's delivery count (deferrals included); Message::last_attempt() leaves them out.
  /// Deferrals are remembered in memory: after a restart they count as attempts when a handler
  /// fails, and a message is dead-lettered without running only past max_attempts +
  /// kDeferralAllowance deliveries (so with a breaker a crash loop lasts that long). May be shared.
  std::shared_ptr<CircuitBreaker> circuit_breaker{};
  /// At most `rate` messages per second are fetched (token bucket); handlers never sleep for it.
  std::optional<RateLimiterOptions> rate_limit{};
  /// With a circuit breaker: deliveries past max_attempts that may have been deferrals this
  /// process did not see (before a restart, or on another instance), so are not yet taken as
  /// deliveries without a verdict.
  static constexpr int64_t kDeferralAllowance = 1000;
};

struct ConsumerOptions {
  /// Ensure the DLQ stream of this app (and its events stream when subscribing to own topics)
  /// in start().
  bool ensure_topology = true;
  /// With a finite SubscriptionOptions::max_deliver: dead-letter a message the server stopped
  /// delivering, from its MAX_DELIVERIES advisory (sent once, on core NATS; tried for about 3 s).
  /// Nothing listens with the default, unlimited max_deliver: the server never gives up there.
  bool capture_max_deliveries = true;
  /// Also read this app's replays (natspubsub-dlq replay) for each subscription: a second durable
  /// replay_durable(stream, durable) (dlq.hpp) on the replay stream "{env}-{app}-replay" (created
  /// in start() when ensure_topology, else used when it exists), with the same handler, middleware
  /// and inbox, and up to 4 workers. When the route cannot be set up (a stream overlapping its
  /// subjects, say) start() warns and goes on without it. Its stats are found by
  /// stats(replay_durable(stream, durable)), not in stats().
  bool replay_route = true;
    /// Prefix of DLQ subjects; default "dlq.{env}.{app}".
  std::string dlq_subject_prefix{};
  /// The deadline the destructor gives stop().
  Millis stop_timeout{30000};
};

/// What stop() did.
struct StopReport {
  uint64_t nacked_unstarted = 0;  ///< fetched, not started: NAKed without delay
  uint64_t finished = 0;          ///< handlers that were running and finished before the deadline
  uint64_t abandoned = 0;         ///< handlers still running at the deadline: their messages were NAKed
  bool within_deadline = true;
};

/// Runs handlers for subscriptions on a borrowed Connection (which must outlive it).
/// subscribe() and use() before start(); stats() any time. The durable consumers stay on the
/// server after stop(), so another instance (or the next start) continues where this one ended.
class Consumer {
 public:
  explicit Consumer(Connection& connection, ConsumerOptions options = {});
  /// stop(options.stop_timeout), then joins every thread (waits for handlers still running).
  ~Consumer();
  Consumer(const Consumer&) = delete;
  Consumer& operator=(const Consumer&) = delete;

  /// Middleware for every subscription, outermost first.
  Consumer& use(Middleware middleware);

  /// A topic of this app ("order.created") or a wildcard of it ("order.*", ">"):
  /// subject "{env}.{app}.{topic}". Throws SubjectError or ConfigError.
  Consumer& subscribe(std::string_view topic, Handler handler, SubscriptionOptions options = {});
  /// A full subject or filter, e.g. another app's "production.payments.payment.settled".
  Consumer& subscribe_subject(std::string_view subject_filter, Handler handler, SubscriptionOptions options = {});

  /// Ensures streams and durable consumers, then starts fetching. Throws TopologyError,
  /// ConfigError (bad options) or NatsError; on failure nothing keeps running.
  void start();
  /// Stops fetching (a pull already waiting ends within fetch_timeout: cnats cannot cancel it;
  /// what it brings still runs on idle workers), NAKs without delay the fetched messages that have
  /// not started, lets running handlers finish until `deadline` (then NAKs theirs and requests
  /// Message::stop_token), flushes acks and NAKs. The durables stay. Safe to call twice.
  /// A NAK on stop counts as a delivery of that message (JetStream keeps no other count).
  StopReport stop(Millis deadline);
  StopReport stop();

  [[nodiscard]] bool running() const noexcept;
  [[nodiscard]] std::vector<SubscriptionStats> stats() const;
  /// Stats of the subscription with this durable name; ConfigError when there is none.
  [[nodiscard]] SubscriptionStats stats(std::string_view durable) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace natspubsub
