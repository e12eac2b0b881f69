#include "subscription.hpp"

#include <algorithm>
#include <chrono>
#include <exception>

#include <natspubsub/connection.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/log.hpp>
#include <natspubsub/request.hpp>

namespace natspubsub::detail {
namespace {

using Clock = std::chrono::steady_clock;

// Every wait of a worker is bounded by this, so a missed notification costs at most this much.
constexpr Millis kIdleWait{100};
constexpr Millis kAdvisoryPoll{200};

}  // namespace

void Subscription::bind(Connection& connection, const DlqPublisher& dlq, Millis ack_timeout,
                        bool capture_max_deliveries) {
  // Bind to the existing durable: cnats must neither create another consumer nor delete this
  // one when the subscription goes.
  jsSubOptions so;
  jsSubOptions_Init(&so);
  so.Stream = stream.c_str();
  so.Consumer = durable.c_str();
  natsSubscription* raw_pull = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus status = js_PullSubscribe(&raw_pull, connection.jetstream(), filter.c_str(), durable.c_str(), nullptr, &so,
                                       &jerr);
  pull.reset(raw_pull);
  check(status, "binding to consumer " + durable + " on stream " + stream, jerr);
  queue = std::make_unique<DeliveryQueue>(capacity());
  fetcher = std::make_unique<Fetcher>(pull.get(), *queue, Fetcher::Options{durable, fetch_timeout, breaker, limiter.get()});

  acks = std::make_unique<AckPipeline>(connection, durable, ack_timeout);
  letters = std::make_unique<DeadLetterPath>(connection, dlq, durable, stream, replay_of, *backoff);

  if (capture_max_deliveries && max_deliver > 0) {
    // Only a finite max_deliver (set by the user) lets the server stop delivering a message the
    // runtime has not settled: a DLQ outage that outlasts the deliveries left, or, with a circuit
    // breaker, deferrals past it. The advisory is then the one chance left to dead-letter it; it
    // is sent once, on core NATS, to whoever listens then, so it is a best effort. With the
    // default (unlimited) no advisory is ever sent, and nothing subscribes.
    // A queue group: of all instances sharing the durable, one handles each advisory.
    const std::string subject = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES." + stream + "." + durable;
    const std::string group = "natspubsub-dlq-" + durable;
    natsSubscription* adv = nullptr;
    status = natsConnection_QueueSubscribeSync(&adv, connection.native(), subject.c_str(), group.c_str());
    advisory.reset(adv);
    check(status, "subscribing to " + subject);
  }
  logger()->info("subscription {} -> consumer {} on stream {}: concurrency {}, prefetch {}, max_attempts {}, "
                 "backoff {}, ack_wait {} ms, max_deliver {}",
                 filter, durable, stream, concurrency, prefetch, max_attempts,
                 backoff->describe(), ack_wait.count(), max_deliver);
  if (breaker || limiter)
    logger()->info("subscription {}: circuit breaker {}, rate limit {}", filter,
                   breaker ? breaker->options().name : "none",
                   limiter ? fmt::format("{}/s", limiter->options().rate) : std::string("none"));
}

void Subscription::start() {
  for (int i = 0; i < concurrency; ++i) workers.emplace_back([this](std::stop_token st) { worker_loop(st); });
  fetcher->start();
  if (advisory) advisor = std::jthread([this](std::stop_token st) { advisory_loop(st); });
}

// Sends "+ACK" with a reply subject and returns at once; "acked" in the stats counts when the
// server's answer arrives (AckPipeline).
void Subscription::ack(Delivery& d, const Message& m) {
  acks->ack(d, m.envelope.event_id, m.metadata.stream_sequence);
}

void Subscription::process(Delivery& d) {
  Message m;
  const auto deferred_deliveries = prepare(d, m);
  if (!deferred_deliveries) return;
  auto failure = run_handler(m);
  settle(d, m, *deferred_deliveries, failure);
}

std::optional<uint64_t> Subscription::prepare(Delivery& d, Message& m) {
  // The natsMsg is only read here; no verdict can have been sent before the handler ran.
  const bool started_here = d.begin([&](natsMsg* msg) {
    m.subject = natsMsg_GetSubject(msg);
    m.body = body_of(msg);
    m.headers = read_headers(msg);
    jsMsgMetaData* meta = nullptr;
    if (natsMsg_GetMetaData(&meta, msg) == NATS_OK) {
      m.metadata.stream = meta->Stream != nullptr ? meta->Stream : "";
      m.metadata.consumer = meta->Consumer != nullptr ? meta->Consumer : durable;
      m.metadata.stream_sequence = meta->Sequence.Stream;
      m.metadata.consumer_sequence = meta->Sequence.Consumer;
      m.metadata.deliveries = meta->NumDelivered;
      m.metadata.pending = meta->NumPending;
      m.metadata.timestamp = SystemTime{std::chrono::milliseconds{meta->Timestamp / 1000000}};
      jsMsgMetaData_Destroy(meta);
    }
  });
  if (!started_here) return std::nullopt;
  if (!replay_of.empty()) {
    // The handler and the inbox see the failed durable and the original subject; the metadata
    // stays the replay's own delivery (stream, sequence, delivery count).
    m.metadata.consumer = replay_of;
    std::string ignored_stream;
    uint64_t ignored_sequence = 0;
    restore_origin(m.headers, m.subject, ignored_stream, ignored_sequence);
  }
  m.max_attempts = max_attempts;
  m.stop_token = handler_stop;
  if (m.metadata.deliveries == 0) {
    // Without the delivery count there is no safe retry decision; let the server redeliver.
    logger()->error("{}: message on {} has no JetStream metadata; NAKed", durable, m.subject);
    d.nak(backoff->delay(1));
    return std::nullopt;
  }

  try {
    m.envelope = Envelope::decode(m.body);
  } catch (const std::exception& e) {
    // Retrying cannot fix a body; the consumer moves on to the next message.
    if (letters->dead_letter(d, m, DlqReason::malformed, current_exception_class(), e.what()))
      counters.malformed++;
    return std::nullopt;
  }

  // Decided here earlier, refused by the DLQ: the same letter again, not the handler again.
  if (auto letter = letters->pending_letter(m.metadata.stream_sequence)) {
    letters->dead_letter(d, m, letter->reason, letter->error_class, letter->error_message);
    return std::nullopt;
  }
  // Attempts are counted from the server's delivery count, before the handler runs: a delivery
  // past max_attempts means no earlier one ended in an ack or a stored dead letter (the process
  // crashed or was killed inside the handler, the handler hung past ack_wait, the DLQ refused
  // the letter while another process held it; also an ack lost in a reconnect, or a hand-back
  // on stop, which JetStream counts as deliveries too). It goes to the DLQ without running the
  // handler again; that is what ends a crash loop, and it needs no advisory from the server.
  const uint64_t deferred_deliveries = deferrals_of(m.metadata.stream_sequence);
  const uint64_t attempts_before =
      m.metadata.deliveries - std::min(m.metadata.deliveries - 1, deferred_deliveries) - 1;
  if (attempts_before >= max_attempts + unseen_deferral_allowance) {
    forget_deferrals(m.metadata.stream_sequence);
    const std::string why = "delivered " + std::to_string(m.metadata.deliveries) + " times, " +
                            std::to_string(attempts_before) + " of them attempts (max_attempts " +
                            std::to_string(max_attempts) +
                            "), and the handler never gave a verdict: it crashed the process or hung past "
                            "ack_wait (or a verdict was lost: an ack or a dead letter that did not reach the "
                            "server, a hand-back on stop)";
    if (letters->dead_letter(d, m, DlqReason::max_deliveries, "", why)) counters.max_deliveries++;
    return std::nullopt;
  }

  // protection: an open circuit runs no handler; the message waits without spending an attempt.
  if (breaker && !breaker->allow()) {
    defer(d, m, "circuit open");
    return std::nullopt;
  }
  m.max_attempts = max_attempts + deferred_deliveries;  // so Message::last_attempt() ignores deferrals
  return deferred_deliveries;
}

std::optional<HandlerFailure> Subscription::run_handler(const Message& m) {
  const auto start = Clock::now();
  std::optional<HandlerFailure> failure;
  try {
    // Requests made by the handler carry this message's correlation id (request.hpp).
    const std::string correlation = m.header(kCorrelationIdHeader);
    CorrelationScope scope(correlation.empty() ? m.envelope.event_id : correlation);
    chain(m);
  } catch (const std::exception& e) {
    failure = HandlerFailure{std::current_exception(), current_exception_class(), e.what()};
  } catch (...) {
    failure = HandlerFailure{std::current_exception(), current_exception_class(), "non-standard exception"};
  }
  latency.record(std::chrono::duration_cast<Micros>(Clock::now() - start));
  return failure;
}

void Subscription::settle(Delivery& d, const Message& m, uint64_t deferred_deliveries,
                          const std::optional<HandlerFailure>& failure) {
  if (d.state() == DeliveryState::abandoned) {
    logger()->warn("{}: handler for event {} finished after the stop deadline; its message was already handed back",
                   durable, m.envelope.event_id);
    return;
  }

  if (!failure) {
    if (breaker) breaker->record_success();
    forget_deferrals(m.metadata.stream_sequence);
    ack(d, m);
    return;
  }
  counters.handler_errors++;
  const Verdict verdict = policy.decide(*failure, m);
  if (breaker) {
    // protection: only a failure worth retrying says something about a dependency. One that
    // opens the circuit, or comes while it is not closed, defers the message: no attempt spent.
    if (verdict != Verdict::retry) {
      breaker->record_success();
    } else {
      breaker->record_failure(failure->message);
      if (breaker->state() != CircuitState::closed) {
        defer(d, m, "failed while the circuit is not closed");
        return;
      }
    }
  }
  if (verdict != Verdict::retry) forget_deferrals(m.metadata.stream_sequence);
  switch (verdict) {
    case Verdict::discard:
      ack(d, m);
      counters.discarded++;
      logger()->warn("{}: event {} (seq {}) discarded by the error policy after {}: {}", durable,
                     m.envelope.event_id, m.metadata.stream_sequence, failure->error_class, failure->message);
      return;
    case Verdict::dead_letter:
      letters->dead_letter(d, m, DlqReason::permanent_error, failure->error_class, failure->message);
      return;
    case Verdict::retry:
      break;
  }
  const uint64_t attempt = m.metadata.deliveries - std::min(m.metadata.deliveries, deferred_deliveries);
  if (attempt >= max_attempts) {
    forget_deferrals(m.metadata.stream_sequence);
    letters->dead_letter(d, m, DlqReason::attempts_exhausted, failure->error_class, failure->message);
    return;
  }
  const auto delay = backoff->delay(std::max<uint64_t>(1, attempt));
  if (d.nak(delay)) counters.retried++;
  logger()->warn("{}: event {} (seq {}) attempt {}/{} failed ({}: {}); retry in {} ms", durable,
                 m.envelope.event_id, m.metadata.stream_sequence, attempt, max_attempts,
                 failure->error_class, failure->message, delay.count());
}

// ---- protection: circuit breaker ----

uint64_t Subscription::deferrals_of(uint64_t sequence) {
  std::lock_guard lock(deferrals_mutex_);
  auto it = deferrals_.find(sequence);
  return it == deferrals_.end() ? 0 : it->second;
}

void Subscription::forget_deferrals(uint64_t sequence) {
  std::lock_guard lock(deferrals_mutex_);
  deferrals_.erase(sequence);
}

// NAKs with the time left until the circuit's next probe: the message waits for the dependency.
void Subscription::defer(Delivery& d, const Message& m, const char* why) {
  auto delay = breaker->retry_after();
  if (delay.count() <= 0) delay = breaker->options().open_duration;
  if (!d.nak(delay)) return;
  deferred++;
  {
    std::lock_guard lock(deferrals_mutex_);
    // Entries of messages another instance finished are never erased here; bound the map.
    if (deferrals_.size() >= 100000) deferrals_.clear();
    deferrals_[m.metadata.stream_sequence]++;
  }
  logger()->debug("{}: event {} (seq {}) deferred {} ms: {}", durable, m.envelope.event_id,
                  m.metadata.stream_sequence, delay.count(), why);
}

// Deliveries already queued behind `first` go into the same inbox transaction: a batch never
// waits for messages to arrive. A worker takes at most half the subscription's capacity, so the
// fetcher can pull the next batch while this one runs.
bool Subscription::take_solo(uint64_t stream_sequence) {
  std::lock_guard lock(solo_mutex);
  return solo.erase(stream_sequence) > 0;  // left in solo_order; skipped when it comes up there
}

void Subscription::remember_solo(uint64_t stream_sequence) {
  constexpr std::size_t kMaxSolo = 65536;
  std::lock_guard lock(solo_mutex);
  if (!solo.insert(stream_sequence).second) return;
  solo_order.push_back(stream_sequence);
  while (solo_order.size() > kMaxSolo) {
    solo.erase(solo_order.front());
    solo_order.pop_front();
  }
}

void Subscription::process_batch(std::vector<DeliveryPtr>& taken) {
  struct Item {
    Delivery* delivery;
    Message message;
    uint64_t deferred_deliveries = 0;
    std::optional<HandlerFailure> failure;
  };
  std::vector<Item> items;
  items.reserve(taken.size());
  for (auto& d : taken) {
    Item item{d.get(), {}, 0, std::nullopt};
    try {
      auto deferred_deliveries = prepare(*d, item.message);
      if (!deferred_deliveries) continue;  // settled already (malformed, DLQ, deferred, ...)
      item.deferred_deliveries = *deferred_deliveries;
      items.push_back(std::move(item));
    } catch (...) {
      logger()->error("{}: unexpected {} while processing a message; NAKed", durable, current_exception_class());
      d->nak(backoff->delay(1));
    }
  }
  // Those whose last batch did not commit run alone first (see `solo`).
  std::erase_if(items, [&](Item& item) {
    if (items.size() > 1 && !take_solo(item.message.metadata.stream_sequence)) return false;
    try {
      settle(*item.delivery, item.message, item.deferred_deliveries, run_handler(item.message));
    } catch (...) {
      logger()->error("{}: unexpected {} while settling a message; NAKed", durable, current_exception_class());
      item.delivery->nak(backoff->delay(1));
    }
    return true;
  });
  if (items.size() == 1) {
    auto& item = items.front();
    settle(*item.delivery, item.message, item.deferred_deliveries, run_handler(item.message));
    return;
  }
  if (items.empty()) return;

  // Each message runs through the middleware chain, which ends in the InboxHandler: inside the
  // batch's transaction, after its own savepoint. Acks only after the commit.
  std::vector<const Message*> messages;
  messages.reserve(items.size());
  for (const auto& item : items) messages.push_back(&item.message);
  const std::exception_ptr not_committed =
      inbox->run_batch(messages, [&](std::size_t i) { items[i].failure = run_handler(items[i].message); });
  if (not_committed) {
    // Nothing of the batch is stored: every message fails as it would alone on that error.
    HandlerFailure failure{not_committed, {}, {}};
    try {
      std::rethrow_exception(not_committed);
    } catch (const std::exception& e) {
      failure.error_class = current_exception_class();
      failure.message = e.what();
    } catch (...) {
      failure.error_class = current_exception_class();
      failure.message = "non-standard exception";
    }
    logger()->warn("{}: inbox transaction of {} messages not committed ({}: {}); none acked, each runs alone "
                   "when it comes back",
                   durable, items.size(), failure.error_class, failure.message);
    for (auto& item : items) {
      if (!item.failure) item.failure = failure;
      remember_solo(item.message.metadata.stream_sequence);
    }
  }
  for (auto& item : items) {
    try {
      settle(*item.delivery, item.message, item.deferred_deliveries, item.failure);
    } catch (...) {
      logger()->error("{}: unexpected {} while settling a message; NAKed", durable, current_exception_class());
      item.delivery->nak(backoff->delay(1));
    }
  }
}

void Subscription::worker_loop(const std::stop_token& st) {
  const int batch_limit = inbox ? std::min(inbox->max_batch(), std::max(1, capacity() / 2)) : 1;
  while (true) {
    DeliveryPtr d = queue->take(st, kIdleWait);
    if (!d) {
      if (st.stop_requested()) return;
      continue;
    }
    if (batch_limit > 1) {
      std::vector<DeliveryPtr> taken{d};
      for (auto& more : queue->take_queued(static_cast<size_t>(batch_limit - 1))) taken.push_back(std::move(more));
      if (taken.size() > 1) {
        try {
          process_batch(taken);
        } catch (...) {
          logger()->error("{}: unexpected {} while processing a batch; NAKed", durable, current_exception_class());
          for (auto& t : taken) t->nak(backoff->delay(1));
        }
        for (auto& t : taken) queue->finish(t);
        continue;
      }
    }
    try {
      process(*d);
    } catch (...) {
      // process() guards the handler; this is the last line against a bug of ours.
      logger()->error("{}: unexpected {} while processing a message; NAKed", durable, current_exception_class());
      d->nak(backoff->delay(1));
    }
    queue->finish(d);
  }
}

void Subscription::advisory_loop(const std::stop_token& st) {
  while (!st.stop_requested()) {
    natsMsg* raw = nullptr;
    natsStatus status = natsSubscription_NextMsg(&raw, advisory.get(), kAdvisoryPoll.count());
    if (status == NATS_TIMEOUT) continue;
    if (status != NATS_OK) {
      queue->pause(st, kAdvisoryPoll);
      continue;
    }
    MsgPtr message(raw);
    try {
      if (letters->dead_letter_from_advisory(body_of(message.get()), st)) counters.max_deliveries++;
    } catch (const std::exception& e) {
      logger()->error("{}: MAX_DELIVERIES advisory not handled: {}", durable, e.what());
    }
  }
}

SubscriptionStats Subscription::stats() {
  SubscriptionStats out;
  out.subject = filter;
  out.durable = durable;
  out.stream = stream;
  const auto& c = counters;
  out.received = fetcher->received();
  out.acked = acks->confirmed();
  out.retried = c.retried;
  out.dead_lettered = letters->dead_lettered();
  out.discarded = c.discarded;
  out.malformed = c.malformed;
  out.max_deliveries = c.max_deliveries;
  out.handler_errors = c.handler_errors;
  out.nacked_on_stop = c.nacked_on_stop;
  out.ack_failures = acks->failed();
  out.dlq_failures = letters->failures();
  const auto counts = queue->counts();
  out.in_flight = counts.outstanding;
  out.running = static_cast<uint64_t>(counts.running);
  out.latency = latency.snapshot();
  out.deferred = deferred;  // protection
  if (breaker) out.circuit = breaker->stats();
  if (limiter) out.rate_limit = limiter->stats();
  return out;
}

}  // namespace natspubsub::detail
