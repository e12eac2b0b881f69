#include <natspubsub/consumer.hpp>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <stop_token>
#include <thread>

#include <natspubsub/connection.hpp>
#include <natspubsub/dlq.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/log.hpp>
#include <natspubsub/subject.hpp>
#include <natspubsub/topology.hpp>

#include "nats_util.hpp"
#include "progress_ticker.hpp"
#include "subscription.hpp"

namespace natspubsub {
namespace {

using Clock = std::chrono::steady_clock;

constexpr Millis kDefaultMaxInProgress{600000};
constexpr Millis kFlushTimeout{2000};

using detail::Subscription;

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
  std::unique_ptr<detail::ProgressTicker> ticker;  // ack expiry and +WPI for every subscription

  ~Impl() {
    // Workers inside a handler that outlived stop() are waited for here: a thread is never left
    // running with nobody to join it.
    ticker.reset();
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

    std::vector<Middleware> chain = middleware;
    chain.insert(chain.end(), o.middleware.begin(), o.middleware.end());
    s->chain = compose(chain, r.handler);
    // Batches only for an InboxHandler given as it is: it is the innermost call of the chain.
    if (const auto* inbox = r.handler.target<InboxHandler>(); inbox != nullptr && inbox->max_batch() > 1)
      s->inbox = std::make_shared<InboxHandler>(*inbox);
    s->handler_stop = handler_stop.get_token();

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
    s->bind(*connection, *dlq, config.connection.jetstream_timeout, options.capture_max_deliveries);
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
    for (auto& s : subs) s->start();
    ticker = std::make_unique<detail::ProgressTicker>(subs);
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
    ticker.reset();

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
    if (s->replay_of.empty()) out.push_back(s->stats());  // replay routes: by name only
  }
  return out;
}

SubscriptionStats Consumer::stats(std::string_view durable) const {
  if (!impl_->subs_ready.load(std::memory_order_acquire))
    throw ConfigError("durable", "no running subscription has durable \"" + std::string(durable) + "\" (not started)");
  for (const auto& s : impl_->subs) {
    if (s->durable == durable) return s->stats();
  }
  throw ConfigError("durable", "no running subscription has durable \"" + std::string(durable) + "\"");
}

}  // namespace natspubsub
