#include <natspubsub/consumer.hpp>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <set>
#include <stop_token>
#include <thread>
#include <unordered_map>

#include <natspubsub/connection.hpp>
#include <natspubsub/dlq.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/log.hpp>
#include <natspubsub/request.hpp>
#include <natspubsub/subject.hpp>
#include <natspubsub/topology.hpp>

#include "ack_pipeline.hpp"
#include "dead_letter_path.hpp"
#include "delivery.hpp"
#include "delivery_queue.hpp"
#include "fetcher.hpp"
#include "nats_util.hpp"

namespace natspubsub {
namespace {

using detail::body_of;
using detail::read_headers;

using Clock = std::chrono::steady_clock;

constexpr Millis kDefaultMaxInProgress{600000};
// Every wait in the runtime is bounded by this, so a missed notification costs at most this much.
constexpr Millis kIdleWait{100};
constexpr Millis kAdvisoryPoll{200};
constexpr Millis kFlushTimeout{2000};

using detail::Delivery;
using detail::DeliveryPtr;
using detail::DeliveryState;

struct Counters {
  // acked and ack_failures are counted by the subscription's AckPipeline, dead_lettered and
  // dlq_failures by its DeadLetterPath.
  // received is counted by the subscription's Fetcher.
  std::atomic<uint64_t> retried{0}, discarded{0}, malformed{0}, max_deliveries{0}, handler_errors{0},
      nacked_on_stop{0};
};

}  // namespace

const char* to_string(Verdict verdict) noexcept {
  switch (verdict) {
    case Verdict::retry: return "retry";
    case Verdict::dead_letter: return "dead_letter";
    case Verdict::discard: return "discard";
  }
  return "unknown";
}

ErrorPolicy& ErrorPolicy::add_rule(Rule rule) {
  if (!rule) throw ConfigError("error_policy", "a rule must be callable");
  rules_.push_back(std::move(rule));
  return *this;
}

Verdict ErrorPolicy::decide(const HandlerFailure& failure, const Message& message) const {
  for (size_t i = 0; i < rules_.size(); ++i) {
    try {
      if (auto verdict = rules_[i](failure, message)) return *verdict;
    } catch (...) {
      logger()->warn("error policy rule {} threw ({}); skipped", i, current_exception_class());
    }
  }
  if (failure.exception) {
    try {
      std::rethrow_exception(failure.exception);
    } catch (const PermanentError&) {
      return Verdict::dead_letter;
    } catch (...) {
    }
  }
  return Verdict::retry;
}

namespace {

struct Registration {
  std::string filter;
  bool own_topic = false;
  std::string durable;
  Handler handler;
  SubscriptionOptions options;
};

// One durable pull consumer with its fetcher, workers and advisory listener.
struct Subscription {
  // Settings, fixed before the threads start.
  std::string filter;
  std::string durable;
  std::string stream;
  // Set on a replay subscription: the durable whose replays it reads (natspubsub-dlq replay).
  // Its messages are shown to the handler, the inbox and the DLQ under that durable's name.
  std::string replay_of;
  int concurrency = 1;
  int prefetch = 0;
  uint64_t max_attempts = 1;
  std::optional<Backoff> backoff;
  Millis ack_wait{0};
  Millis in_progress_interval{0};
  Millis max_in_progress{0};
  Millis fetch_timeout{0};
  int64_t max_deliver = 0;
  int max_ack_pending = 0;
  ErrorPolicy policy;
  Next chain;

  detail::SubscriptionPtr pull;
  detail::SubscriptionPtr advisory;
  std::unique_ptr<detail::AckPipeline> acks;
  std::unique_ptr<detail::DeadLetterPath> letters;

  std::unique_ptr<detail::DeliveryQueue> queue;  // between the fetcher, the workers and stop()

  Counters counters;
  LatencyHistogram latency;

  // ---- protection (circuit breaker, rate limit) ----
  std::shared_ptr<CircuitBreaker> breaker;
  std::unique_ptr<RateLimiter> limiter;
  std::atomic<uint64_t> deferred{0};
  std::mutex deferrals_mutex;
  // Stream sequence -> deliveries that were deferrals (circuit not closed), not attempts. In
  // memory: after a restart a message's earlier deferrals count as attempts again.
  std::unordered_map<uint64_t, uint64_t> deferrals;
  // Deliveries past max_attempts that a delivery count may hold without this process having seen
  // them as deferrals (an earlier process deferred them): kDeferralAllowance with a breaker, else 0.
  uint64_t unseen_deferral_allowance = 0;

  // Last members: destroyed (stopped and joined) first, while the state above still exists.
  std::unique_ptr<detail::Fetcher> fetcher;
  std::jthread advisor;
  std::vector<std::jthread> workers;

  [[nodiscard]] int capacity() const { return concurrency + prefetch; }
  /// The durable that owns the messages: replay_of for a replay subscription.
  [[nodiscard]] const std::string& owner() const { return replay_of.empty() ? durable : replay_of; }
};

}  // namespace

// Workers of a replay route (at most; never more than the subscription's own).
constexpr int kReplayConcurrency = 4;

struct Consumer::Impl {
  Connection* connection = nullptr;
  Config config;
  ConsumerOptions options;
  std::vector<Middleware> middleware;
  std::vector<Registration> registrations;
  std::unique_ptr<DlqPublisher> dlq;
  std::stop_source handler_stop;  // Message::stop_token: the stop deadline passed

  std::mutex lifecycle;
  std::atomic<bool> running{false};
  bool started = false;
  bool workers_stuck = false;  // some handler outlived the stop deadline: joined in the destructor

  std::vector<std::unique_ptr<Subscription>> subs;  // set once by start(), then only read
  std::atomic<bool> subs_ready{false};              // stats() may read `subs` (set after it)
  std::jthread ticker;  // +WPI for every outstanding message

  ~Impl() {
    // Workers inside a handler that outlived stop() are waited for here: a thread is never left
    // running with nobody to join it.
    ticker = std::jthread();
    for (auto& s : subs) {
      if (s->fetcher) {
        s->fetcher->request_stop();
        s->fetcher->join();
      }
      s->advisor = std::jthread();
      for (auto& w : s->workers) w.request_stop();
      if (s->queue) s->queue->wake_all();
      s->workers.clear();
    }
    subs.clear();
  }

  // ---- settling a message ------------------------------------------------------------------

  // Sends "+ACK" with a reply subject and returns at once; "acked" in the stats counts when the
  // server's answer arrives (AckPipeline).
  static void ack(Subscription& s, Delivery& d, const Message& m) {
    s.acks->ack(d, m.envelope.event_id, m.metadata.stream_sequence);
  }


  // ---- one message ---------------------------------------------------------------------------

  void process(Subscription& s, Delivery& d) {
    Message m;
    // The natsMsg is only read here; no verdict can have been sent before the handler ran.
    const bool started_here = d.begin([&](natsMsg* msg) {
      m.subject = natsMsg_GetSubject(msg);
      m.body = body_of(msg);
      m.headers = read_headers(msg);
      jsMsgMetaData* meta = nullptr;
      if (natsMsg_GetMetaData(&meta, msg) == NATS_OK) {
        m.metadata.stream = meta->Stream != nullptr ? meta->Stream : "";
        m.metadata.consumer = meta->Consumer != nullptr ? meta->Consumer : s.durable;
        m.metadata.stream_sequence = meta->Sequence.Stream;
        m.metadata.consumer_sequence = meta->Sequence.Consumer;
        m.metadata.deliveries = meta->NumDelivered;
        m.metadata.pending = meta->NumPending;
        m.metadata.timestamp = SystemTime{std::chrono::milliseconds{meta->Timestamp / 1000000}};
        jsMsgMetaData_Destroy(meta);
      }
    });
    if (!started_here) return;
    if (!s.replay_of.empty()) {
      // The handler and the inbox see the failed durable and the original subject; the metadata
      // stays the replay's own delivery (stream, sequence, delivery count).
      m.metadata.consumer = s.replay_of;
      std::string ignored_stream;
      uint64_t ignored_sequence = 0;
      detail::restore_origin(m.headers, m.subject, ignored_stream, ignored_sequence);
    }
    m.max_attempts = s.max_attempts;
    m.stop_token = handler_stop.get_token();
    if (m.metadata.deliveries == 0) {
      // Without the delivery count there is no safe retry decision; let the server redeliver.
      logger()->error("{}: message on {} has no JetStream metadata; NAKed", s.durable, m.subject);
      d.nak(s.backoff->delay(1));
      return;
    }

    try {
      m.envelope = Envelope::decode(m.body);
    } catch (const std::exception& e) {
      // Retrying cannot fix a body; the consumer moves on to the next message.
      if (s.letters->dead_letter(d, m, DlqReason::malformed, current_exception_class(), e.what()))
        s.counters.malformed++;
      return;
    }

    // Decided here earlier, refused by the DLQ: the same letter again, not the handler again.
    if (auto letter = s.letters->pending_letter(m.metadata.stream_sequence)) {
      s.letters->dead_letter(d, m, letter->reason, letter->error_class, letter->error_message);
      return;
    }
    // Attempts are counted from the server's delivery count, before the handler runs: a delivery
    // past max_attempts means no earlier one ended in an ack or a stored dead letter (the process
    // crashed or was killed inside the handler, the handler hung past ack_wait, the DLQ refused
    // the letter while another process held it; also an ack lost in a reconnect, or a hand-back
    // on stop, which JetStream counts as deliveries too). It goes to the DLQ without running the
    // handler again; that is what ends a crash loop, and it needs no advisory from the server.
    const uint64_t deferred_deliveries = deferrals_of(s, m.metadata.stream_sequence);
    const uint64_t attempts_before =
        m.metadata.deliveries - std::min(m.metadata.deliveries - 1, deferred_deliveries) - 1;
    if (attempts_before >= s.max_attempts + s.unseen_deferral_allowance) {
      forget_deferrals(s, m.metadata.stream_sequence);
      const std::string why = "delivered " + std::to_string(m.metadata.deliveries) + " times, " +
                              std::to_string(attempts_before) + " of them attempts (max_attempts " +
                              std::to_string(s.max_attempts) +
                              "), and the handler never gave a verdict: it crashed the process or hung past "
                              "ack_wait (or a verdict was lost: an ack or a dead letter that did not reach the "
                              "server, a hand-back on stop)";
      if (s.letters->dead_letter(d, m, DlqReason::max_deliveries, "", why)) s.counters.max_deliveries++;
      return;
    }

    // protection: an open circuit runs no handler; the message waits without spending an attempt.
    if (s.breaker && !s.breaker->allow()) {
      defer(s, d, m, "circuit open");
      return;
    }
    m.max_attempts = s.max_attempts + deferred_deliveries;  // so Message::last_attempt() ignores deferrals

    const auto start = Clock::now();
    std::optional<HandlerFailure> failure;
    try {
      // Requests made by the handler carry this message's correlation id (request.hpp).
      const std::string correlation = m.header(kCorrelationIdHeader);
      CorrelationScope scope(correlation.empty() ? m.envelope.event_id : correlation);
      s.chain(m);
    } catch (const std::exception& e) {
      failure = HandlerFailure{std::current_exception(), current_exception_class(), e.what()};
    } catch (...) {
      failure = HandlerFailure{std::current_exception(), current_exception_class(), "non-standard exception"};
    }
    s.latency.record(std::chrono::duration_cast<Micros>(Clock::now() - start));

    if (d.state() == DeliveryState::abandoned) {
      logger()->warn("{}: handler for event {} finished after the stop deadline; its message was already handed back",
                     s.durable, m.envelope.event_id);
      return;
    }

    if (!failure) {
      if (s.breaker) s.breaker->record_success();
      forget_deferrals(s, m.metadata.stream_sequence);
      ack(s, d, m);
      return;
    }
    s.counters.handler_errors++;
    const Verdict verdict = s.policy.decide(*failure, m);
    if (s.breaker) {
      // protection: only a failure worth retrying says something about a dependency. One that
      // opens the circuit, or comes while it is not closed, defers the message: no attempt spent.
      if (verdict != Verdict::retry) {
        s.breaker->record_success();
      } else {
        s.breaker->record_failure(failure->message);
        if (s.breaker->state() != CircuitState::closed) {
          defer(s, d, m, "failed while the circuit is not closed");
          return;
        }
      }
    }
    if (verdict != Verdict::retry) forget_deferrals(s, m.metadata.stream_sequence);
    switch (verdict) {
      case Verdict::discard:
        ack(s, d, m);
        s.counters.discarded++;
        logger()->warn("{}: event {} (seq {}) discarded by the error policy after {}: {}", s.durable,
                       m.envelope.event_id, m.metadata.stream_sequence, failure->error_class, failure->message);
        return;
      case Verdict::dead_letter:
        s.letters->dead_letter(d, m, DlqReason::permanent_error, failure->error_class, failure->message);
        return;
      case Verdict::retry:
        break;
    }
    const uint64_t attempt = m.metadata.deliveries - std::min(m.metadata.deliveries, deferred_deliveries);
    if (attempt >= s.max_attempts) {
      forget_deferrals(s, m.metadata.stream_sequence);
      s.letters->dead_letter(d, m, DlqReason::attempts_exhausted, failure->error_class, failure->message);
      return;
    }
    const auto delay = s.backoff->delay(std::max<uint64_t>(1, attempt));
    if (d.nak(delay)) s.counters.retried++;
    logger()->warn("{}: event {} (seq {}) attempt {}/{} failed ({}: {}); retry in {} ms", s.durable,
                   m.envelope.event_id, m.metadata.stream_sequence, attempt, s.max_attempts,
                   failure->error_class, failure->message, delay.count());
  }

  // ---- protection: circuit breaker and rate limit -------------------------------------------

  static uint64_t deferrals_of(Subscription& s, uint64_t sequence) {
    std::lock_guard lock(s.deferrals_mutex);
    auto it = s.deferrals.find(sequence);
    return it == s.deferrals.end() ? 0 : it->second;
  }

  static void forget_deferrals(Subscription& s, uint64_t sequence) {
    std::lock_guard lock(s.deferrals_mutex);
    s.deferrals.erase(sequence);
  }

  // NAKs with the time left until the circuit's next probe: the message waits for the dependency.
  void defer(Subscription& s, Delivery& d, const Message& m, const char* why) {
    auto delay = s.breaker->retry_after();
    if (delay.count() <= 0) delay = s.breaker->options().open_duration;
    if (!d.nak(delay)) return;
    s.deferred++;
    {
      std::lock_guard lock(s.deferrals_mutex);
      // Entries of messages another instance finished are never erased here; bound the map.
      if (s.deferrals.size() >= 100000) s.deferrals.clear();
      s.deferrals[m.metadata.stream_sequence]++;
    }
    logger()->debug("{}: event {} (seq {}) deferred {} ms: {}", s.durable, m.envelope.event_id,
                    m.metadata.stream_sequence, delay.count(), why);
  }

  // ---- threads -------------------------------------------------------------------------------

  void worker_loop(Subscription& s, std::stop_token st) {
    while (true) {
      DeliveryPtr d = s.queue->take(st, kIdleWait);
      if (!d) {
        if (st.stop_requested()) return;
        continue;
      }
      try {
        process(s, *d);
      } catch (...) {
        // process() guards the handler; this is the last line against a bug of ours.
        logger()->error("{}: unexpected {} while processing a message; NAKed", s.durable, current_exception_class());
        d->nak(s.backoff->delay(1));
      }
      s.queue->finish(d);
    }
  }

  void ticker_loop(std::stop_token st) {
    Millis tick{1000};
    for (const auto& s : subs) tick = std::min(tick, s->in_progress_interval / 4);
    tick = std::max(tick, Millis{5});
    std::mutex m;
    std::condition_variable_any cv;
    while (!st.stop_requested()) {
      {
        std::unique_lock lock(m);
        cv.wait_for(lock, st, tick, [] { return false; });
      }
      if (st.stop_requested()) return;
      const auto now = Clock::now();
      for (auto& sp : subs) {
        auto& s = *sp;
        s.acks->expire(now, false);
        for (auto& d : s.queue->outstanding()) d->signal_in_progress(now, s.in_progress_interval, s.max_in_progress);
      }
    }
  }

  void advisory_loop(Subscription& s, std::stop_token st) {
    while (!st.stop_requested()) {
      natsMsg* raw = nullptr;
      natsStatus status = natsSubscription_NextMsg(&raw, s.advisory.get(), kAdvisoryPoll.count());
      if (status == NATS_TIMEOUT) continue;
      if (status != NATS_OK) {
        s.queue->pause(st, kAdvisoryPoll);
        continue;
      }
      detail::MsgPtr advisory(raw);
      try {
        if (s.letters->dead_letter_from_advisory(body_of(advisory.get()), st)) s.counters.max_deliveries++;
      } catch (const std::exception& e) {
        logger()->error("{}: MAX_DELIVERIES advisory not handled: {}", s.durable, e.what());
      }
    }
  }

  void add(std::string filter, bool own, Handler handler, SubscriptionOptions options) {
    subject::validate_filter(filter);
    if (!handler) throw ConfigError("handler", "the handler for " + filter + " must be callable");
    Registration r;
    r.durable = options.durable.value_or(Topology::consumer_name(config, filter));
    if (!subject::is_valid_token(r.durable))
      throw ConfigError("durable", "\"" + r.durable + "\" must be one token of letters, digits, '_' or '-'");
    std::lock_guard lock(lifecycle);
    if (started) throw Error("Consumer::subscribe: call before start()");
    for (const auto& other : registrations) {
      if (other.durable == r.durable)
        throw ConfigError("durable", "\"" + r.durable + "\" is used by two subscriptions (" + other.filter + ", " +
                                         filter + ")");
    }
    r.filter = std::move(filter);
    r.own_topic = own;
    r.handler = std::move(handler);
    r.options = std::move(options);
    registrations.push_back(std::move(r));
  }

  // ---- start / stop --------------------------------------------------------------------------

  // `replay_of`: the durable whose replays this subscription reads (empty for a main one).
  std::unique_ptr<Subscription> prepare(Topology& topology, const Registration& r, const std::string& replay_of = {}) {
    const auto& d = config.consumer;
    const auto& o = r.options;
    auto s = std::make_unique<Subscription>();
    s->filter = r.filter;
    s->durable = r.durable;
    s->replay_of = replay_of;
    s->concurrency = o.concurrency.value_or(d.concurrency);
    s->prefetch = o.prefetch.value_or(0);
    const int attempts = o.max_attempts.value_or(d.max_attempts);
    s->backoff = o.backoff ? *o.backoff
                           : (d.backoff.empty() ? Backoff::exponential(Millis{1000}, Millis{60000})
                                                : Backoff::list(d.backoff));
    s->ack_wait = o.ack_wait.value_or(d.ack_wait);
    s->max_ack_pending = o.max_ack_pending.value_or(std::max(d.max_ack_pending, s->capacity()));
    s->breaker = o.circuit_breaker;  // protection
    // Unlimited by default: the runtime counts attempts itself (process()), so the server never
    // stops delivering a message the runtime still owns, however long the DLQ refuses it.
    s->max_deliver = o.max_deliver.value_or(-1);
    s->unseen_deferral_allowance = s->breaker ? SubscriptionOptions::kDeferralAllowance : 0;
    s->in_progress_interval = o.in_progress_interval.value_or(s->ack_wait / 3);
    s->max_in_progress = o.max_in_progress.value_or(kDefaultMaxInProgress);
    s->fetch_timeout = o.fetch_timeout.value_or(d.fetch_timeout);
    s->policy = o.error_policy;

    const std::string f = "subscription " + r.filter + ": ";
    if (s->concurrency < 1 || s->concurrency > 10000) throw ConfigError(f + "concurrency", "must be between 1 and 10000");
    if (s->prefetch < 0) throw ConfigError(f + "prefetch", "must be >= 0");
    if (attempts < 1) throw ConfigError(f + "max_attempts", "must be >= 1");
    s->max_attempts = static_cast<uint64_t>(attempts);
    if (s->ack_wait.count() <= 0) throw ConfigError(f + "ack_wait", "must be greater than 0 ms");
    if (s->max_ack_pending < s->capacity())
      throw ConfigError(f + "max_ack_pending", "must be >= concurrency + prefetch, or fetches stall");
    if (s->max_deliver != -1 && s->max_deliver <= attempts)
      throw ConfigError(f + "max_deliver",
                        "must be -1 (unlimited) or exceed max_attempts, so the runtime decides the last attempt");
    if (s->in_progress_interval.count() <= 0 || s->in_progress_interval >= s->ack_wait)
      throw ConfigError(f + "in_progress_interval", "must be greater than 0 and less than ack_wait");
    if (s->max_in_progress.count() <= 0) throw ConfigError(f + "max_in_progress", "must be greater than 0 ms");
    if (s->fetch_timeout.count() <= 0) throw ConfigError(f + "fetch_timeout", "must be greater than 0 ms");
    if (o.rate_limit) {  // protection
      try {
        s->limiter = std::make_unique<RateLimiter>(*o.rate_limit);
      } catch (const ConfigError& e) {
        throw ConfigError(f + e.field(), e.rule());
      }
    }
    s->queue = std::make_unique<detail::DeliveryQueue>(s->capacity());

    std::vector<Middleware> chain = middleware;
    chain.insert(chain.end(), o.middleware.begin(), o.middleware.end());
    s->chain = compose(chain, r.handler);

    ConsumerSpec spec = Topology::consumer_spec(config, r.filter);
    spec.durable = s->durable;
    spec.ack_wait = s->ack_wait;
    spec.max_deliver = s->max_deliver;
    spec.max_ack_pending = s->max_ack_pending;
    auto ensured = topology.ensure_consumer(spec);
    s->stream = ensured.stream;
    if (ensured.action == EnsureAction::adopted) {
      // The server redelivers after the durable's own ack wait (natspubsub topology mode: one
      // made by NatsPubsub), so in-progress signals must come often enough for that one.
      if (ensured.ack_wait.count() > 0 && ensured.ack_wait < s->ack_wait) {
        s->ack_wait = ensured.ack_wait;
        if (!o.in_progress_interval) s->in_progress_interval = s->ack_wait / 3;
      }
      s->max_deliver = ensured.max_deliver;
      if (ensured.max_deliver > 0 && ensured.max_deliver < static_cast<int64_t>(s->max_attempts))
        logger()->warn("{}: the durable found stops redelivering after {} deliveries, before max_attempts {}; "
                       "the rest is dead-lettered from the MAX_DELIVERIES advisory",
                       s->durable, ensured.max_deliver, s->max_attempts);
    }

    // Bind to the durable we just ensured: cnats must neither create another consumer nor
    // delete this one when the subscription goes.
    jsSubOptions so;
    jsSubOptions_Init(&so);
    so.Stream = s->stream.c_str();
    so.Consumer = s->durable.c_str();
    natsSubscription* pull = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    natsStatus status = js_PullSubscribe(&pull, connection->jetstream(), s->filter.c_str(), s->durable.c_str(), nullptr,
                                         &so, &jerr);
    s->pull.reset(pull);
    detail::check(status, "binding to consumer " + s->durable + " on stream " + s->stream, jerr);
    s->fetcher = std::make_unique<detail::Fetcher>(
        s->pull.get(), *s->queue,
        detail::Fetcher::Options{s->durable, s->fetch_timeout, s->breaker, s->limiter.get()});

    s->acks = std::make_unique<detail::AckPipeline>(*connection, s->durable, config.connection.jetstream_timeout);
    s->letters = std::make_unique<detail::DeadLetterPath>(*connection, *dlq, s->durable, s->stream, s->replay_of,
                                                          *s->backoff);

    if (options.capture_max_deliveries && s->max_deliver > 0) {
      // Only a finite max_deliver (set by the user) lets the server stop delivering a message the
      // runtime has not settled: a DLQ outage that outlasts the deliveries left, or, with a circuit
      // breaker, deferrals past it. The advisory is then the one chance left to dead-letter it; it
      // is sent once, on core NATS, to whoever listens then, so it is a best effort. With the
      // default (unlimited) no advisory is ever sent, and nothing subscribes.
      // A queue group: of all instances sharing the durable, one handles each advisory.
      const std::string subject = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES." + s->stream + "." + s->durable;
      const std::string queue = "natspubsub-dlq-" + s->durable;
      natsSubscription* adv = nullptr;
      status = natsConnection_QueueSubscribeSync(&adv, connection->native(), subject.c_str(), queue.c_str());
      s->advisory.reset(adv);
      detail::check(status, "subscribing to " + subject);
    }
    logger()->info("subscription {} -> consumer {} on stream {}: concurrency {}, prefetch {}, max_attempts {}, "
                   "backoff {}, ack_wait {} ms, max_deliver {}",
                   s->filter, s->durable, s->stream, s->concurrency, s->prefetch, s->max_attempts,
                   s->backoff->describe(), s->ack_wait.count(), s->max_deliver);
    if (s->breaker || s->limiter)
      logger()->info("subscription {}: circuit breaker {}, rate limit {}", s->filter,
                     s->breaker ? s->breaker->options().name : "none",
                     s->limiter ? fmt::format("{}/s", s->limiter->options().rate) : std::string("none"));
    return s;
  }

  void start() {
    std::lock_guard lock(lifecycle);
    if (started) throw Error("Consumer::start: already started (a Consumer runs once; make a new one to restart)");
    if (registrations.empty()) throw ConfigError("subscriptions", "subscribe to at least one topic before start()");
    Topology topology(*connection);
    if (options.ensure_topology) {
      if (options.dlq_subject_prefix.empty()) topology.ensure_dlq_stream();
      if (std::any_of(registrations.begin(), registrations.end(), [](const auto& r) { return r.own_topic; }))
        topology.ensure_events_stream();
      if (config.topology == TopologyMode::natspubsub) {
        // Another app's topics on the shared stream: a NatsPubsub publisher that starts later
        // finds the stream but never adds its subjects, so its events would go nowhere.
        for (const auto& r : registrations) {
          const auto first = r.filter.find('.');
          const auto second = first == std::string::npos ? first : r.filter.find('.', first + 1);
          if (second == std::string::npos || r.filter.compare(0, first, config.env) != 0) continue;
          const std::string app = r.filter.substr(first + 1, second - first - 1);
          if (app == "*" || app == ">" || app == "events" || topology.stream_for(r.filter)) continue;
          topology.ensure_app_subjects(app);
        }
      }
    }
    dlq = std::make_unique<DlqPublisher>(*connection, options.dlq_subject_prefix);
    std::vector<std::unique_ptr<Subscription>> prepared;
    for (const auto& r : registrations) prepared.push_back(prepare(topology, r));  // throws: nothing started yet

    // The replay route: one more durable per subscription, on the replay stream, same handler.
    // It is an extra: when it cannot be set up the subscription runs without it (warned), and
    // natspubsub-dlq says so when asked to replay to it.
    if (options.replay_route) {
      const auto spec = Topology::replay_stream_spec(config);
      bool have_stream = false;
      try {
        if (options.ensure_topology) {
          topology.ensure_replay_stream();
          have_stream = true;
        } else {
          have_stream = topology.stream_for(spec.subjects.front()).has_value();
          if (!have_stream)
            logger()->info("no stream holds {}: replays reach these subscriptions only with natspubsub-dlq --to-subject",
                           spec.subjects.front());
        }
      } catch (const Error& e) {
        logger()->warn("replay route not available ({}): replays reach these subscriptions only with "
                       "natspubsub-dlq --to-subject",
                       e.what());
      }
      const size_t mains = prepared.size();
      for (size_t i = 0; have_stream && i < mains; ++i) {
        const auto& main = *prepared[i];
        Registration rr = registrations[i];
        rr.filter = replay_subject(config, main.stream, main.durable);
        rr.durable = replay_durable(main.stream, main.durable);
        rr.own_topic = false;
        // Replays come one operator command at a time: a few workers, not the subscription's all.
        rr.options.concurrency = std::min(main.concurrency, kReplayConcurrency);
        rr.options.prefetch = 0;
        rr.options.max_ack_pending.reset();
        rr.options.rate_limit.reset();
        try {
          prepared.push_back(prepare(topology, rr, main.durable));
        } catch (const Error& e) {
          logger()->warn("{}: replay route not available ({}): its replays need natspubsub-dlq --to-subject",
                         main.durable, e.what());
        }
      }
    }

    subs = std::move(prepared);
    subs_ready.store(true, std::memory_order_release);
    started = true;
    running = true;
    for (auto& sp : subs) {
      auto* s = sp.get();
      for (int i = 0; i < s->concurrency; ++i)
        s->workers.emplace_back([this, s](std::stop_token st) { worker_loop(*s, st); });
      s->fetcher->start();
      if (s->advisory) s->advisor = std::jthread([this, s](std::stop_token st) { advisory_loop(*s, st); });
    }
    ticker = std::jthread([this](std::stop_token st) { ticker_loop(st); });
  }

  StopReport stop(Millis deadline) {
    std::lock_guard lock(lifecycle);
    StopReport report;
    if (!running) return report;
    const auto until = Clock::now() + deadline;

    // 1. Fetching ends (each pull is bounded by fetch_timeout), and so does the advisory
    // listener (bounded by its poll). Workers keep taking what the last pull brought meanwhile:
    // handing a message back costs it a delivery, running it on an idle worker does not.
    for (auto& s : subs) {
      s->fetcher->request_stop();
      s->advisor.request_stop();
      s->queue->wake_all();
    }
    for (auto& s : subs) {
      s->fetcher->join();
      if (s->advisor.joinable()) s->advisor.join();
    }

    // 2. From here workers start nothing new.
    for (auto& s : subs) s->queue->close();

    // 3. Fetched but not started: NAK without delay, so another instance has them at once.
    uint64_t running_at_stop = 0;
    for (auto& s : subs) {
      uint64_t running = 0;
      auto unstarted = s->queue->take_unstarted(running);
      running_at_stop += running;
      for (auto& d : unstarted) {
        if (d->nak(Millis{0})) {
          s->counters.nacked_on_stop++;
          report.nacked_unstarted++;
        }
      }
      s->queue->wake_all();
    }

    // 4. Running handlers finish (and ack or NAK) until the deadline.
    for (auto& s : subs) s->queue->wait_idle(until);

    // 5. Past the deadline: ask handlers to give up and hand their messages back now.
    for (auto& s : subs) {
      for (auto& d : s->queue->outstanding()) {
        if (d->abandon()) report.abandoned++;
      }
    }
    if (report.abandoned > 0) {
      handler_stop.request_stop();
      report.within_deadline = false;
      workers_stuck = true;
      logger()->warn("stop: {} handler(s) still running after {} ms; their messages were handed back", report.abandoned,
                     deadline.count());
    }
    report.finished = running_at_stop - std::min(running_at_stop, report.abandoned);

    // 6. Threads end. Workers still inside a handler are joined by the destructor.
    for (auto& s : subs) {
      for (auto& w : s->workers) w.request_stop();
      s->queue->wake_all();
    }
    if (!workers_stuck) {
      for (auto& s : subs)
        for (auto& w : s->workers)
          if (w.joinable()) w.join();
    }
    ticker = std::jthread();

    // 7. Acks and NAKs are on the wire before the subscriptions go; the durables stay. The
    // server's answers to the acks are awaited as a synchronous ack would have been: up to the
    // JetStream timeout.
    if (connection->native() != nullptr) natsConnection_FlushTimeout(connection->native(), kFlushTimeout.count());
    const auto answers_by = Clock::now() + config.connection.jetstream_timeout;
    for (auto& s : subs) {
      s->acks->wait_all(answers_by);
      s->acks->expire(Clock::now(), true);
      s->acks->close();
      s->advisory.reset();
      s->pull.reset();
    }
    running = false;
    logger()->info("consumer stopped: {} handed back unstarted, {} finished, {} abandoned", report.nacked_unstarted,
                   report.finished, report.abandoned);
    return report;
  }

  SubscriptionStats stats_of(Subscription& s) const {
    SubscriptionStats out;
    out.subject = s.filter;
    out.durable = s.durable;
    out.stream = s.stream;
    const auto& c = s.counters;
    out.received = s.fetcher->received();
    out.acked = s.acks->confirmed();
    out.retried = c.retried;
    out.dead_lettered = s.letters->dead_lettered();
    out.discarded = c.discarded;
    out.malformed = c.malformed;
    out.max_deliveries = c.max_deliveries;
    out.handler_errors = c.handler_errors;
    out.nacked_on_stop = c.nacked_on_stop;
    out.ack_failures = s.acks->failed();
    out.dlq_failures = s.letters->failures();
    const auto counts = s.queue->counts();
    out.in_flight = counts.outstanding;
    out.running = static_cast<uint64_t>(counts.running);
    out.latency = s.latency.snapshot();
    out.deferred = s.deferred;  // protection
    if (s.breaker) out.circuit = s.breaker->stats();
    if (s.limiter) out.rate_limit = s.limiter->stats();
    return out;
  }
};

Consumer::Consumer(Connection& connection, ConsumerOptions options) : impl_(std::make_unique<Impl>()) {
  impl_->connection = &connection;
  impl_->config = connection.config();
  impl_->options = std::move(options);
}

Consumer::~Consumer() {
  if (!impl_) return;
  try {
    impl_->stop(impl_->options.stop_timeout);
  } catch (...) {
    logger()->error("consumer stop failed in the destructor: {}", current_exception_class());
  }
}

Consumer& Consumer::use(Middleware middleware) {
  if (!middleware) throw ConfigError("middleware", "must be callable");
  std::lock_guard lock(impl_->lifecycle);
  if (impl_->started) throw Error("Consumer::use: call before start()");
  impl_->middleware.push_back(std::move(middleware));
  return *this;
}

Consumer& Consumer::subscribe(std::string_view topic, Handler handler, SubscriptionOptions options) {
  if (topic.empty()) throw SubjectError("subscribe: the topic is empty");
  const std::string filter = impl_->config.env + "." + impl_->config.app + "." + std::string(topic);
  impl_->add(filter, true, std::move(handler), std::move(options));
  return *this;
}

Consumer& Consumer::subscribe_subject(std::string_view subject_filter, Handler handler, SubscriptionOptions options) {
  impl_->add(std::string(subject_filter), false, std::move(handler), std::move(options));
  return *this;
}


void Consumer::start() { impl_->start(); }
StopReport Consumer::stop(Millis deadline) { return impl_->stop(deadline); }
StopReport Consumer::stop() { return impl_->stop(impl_->options.stop_timeout); }
bool Consumer::running() const noexcept { return impl_->running.load(); }

std::vector<SubscriptionStats> Consumer::stats() const {
  std::vector<SubscriptionStats> out;
  if (!impl_->subs_ready.load(std::memory_order_acquire)) return out;  // before start(): nothing yet
  for (const auto& s : impl_->subs) {
    if (s->replay_of.empty()) out.push_back(impl_->stats_of(*s));  // replay routes: by name only
  }
  return out;
}

SubscriptionStats Consumer::stats(std::string_view durable) const {
  if (!impl_->subs_ready.load(std::memory_order_acquire))
    throw ConfigError("durable", "no running subscription has durable \"" + std::string(durable) + "\" (not started)");
  for (const auto& s : impl_->subs) {
    if (s->durable == durable) return impl_->stats_of(*s);
  }
  throw ConfigError("durable", "no running subscription has durable \"" + std::string(durable) + "\"");
}

}  // namespace natspubsub
