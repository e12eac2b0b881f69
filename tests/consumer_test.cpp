// ctest-labels: integration
// The consumer runtime against a real nats-server: acks, retries with backoff, the DLQ (handler
// verdicts, malformed bodies, deliveries past max_attempts), stop with work in flight, load sharing.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <doctest/doctest.h>
#include <nats/nats.h>
#include <nlohmann/json.hpp>

#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/dlq.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/middleware.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/topology.hpp>

#include "support/nats_helpers.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

constexpr const char* kEvents = "test-orders-events";
constexpr const char* kDlq = "test-orders-dlq";
constexpr const char* kCreatedDurable = "test-orders-test_orders_order_created";

template <typename Pred>
bool wait_until(Pred pred, std::chrono::milliseconds timeout) {
  const auto until = Clock::now() + timeout;
  while (Clock::now() < until) {
    if (pred()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return pred();
}

testing::DurableState consumer_state(testing::RawNats& raw, const std::string& stream, const std::string& durable) {
  return raw.durable_state(stream, durable);
}

std::map<std::string, std::string> headers_of(const testing::StoredMessage& m) {
  return {m.headers.begin(), m.headers.end()};
}

// Watches the acknowledgements the runtime sends for one durable, as the server receives them.
class AckTap {
 public:
  AckTap(testing::RawNats& raw, const std::string& stream, const std::string& durable) {
    const std::string subject = "$JS.ACK." + stream + "." + durable + ".>";
    REQUIRE(natsConnection_Subscribe(&sub_, raw.nc(), subject.c_str(), &AckTap::on_msg, this) == NATS_OK);
    REQUIRE(natsConnection_FlushTimeout(raw.nc(), 2000) == NATS_OK);
  }
  ~AckTap() {
    natsSubscription_Unsubscribe(sub_);
    natsSubscription_Destroy(sub_);
  }
  AckTap(const AckTap&) = delete;
  AckTap& operator=(const AckTap&) = delete;

  /// Acks of `kind` ("+ACK", "-NAK", "+TERM", "+WPI"), optionally only for one stream sequence.
  size_t count(const std::string& kind, uint64_t stream_seq = 0) const {
    std::lock_guard lock(mutex_);
    return static_cast<size_t>(std::count_if(seen_.begin(), seen_.end(), [&](const auto& e) {
      return e.second.rfind(kind, 0) == 0 && (stream_seq == 0 || e.first == stream_seq);
    }));
  }
  std::vector<std::string> payloads(const std::string& kind) const {
    std::lock_guard lock(mutex_);
    std::vector<std::string> out;
    for (const auto& e : seen_)
      if (e.second.rfind(kind, 0) == 0) out.push_back(e.second);
    return out;
  }

 private:
  static void on_msg(natsConnection*, natsSubscription*, natsMsg* msg, void* closure) {
    auto* self = static_cast<AckTap*>(closure);
    // $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>
    std::string subject = natsMsg_GetSubject(msg);
    std::vector<std::string> tokens;
    for (size_t start = 0;;) {
      auto dot = subject.find('.', start);
      tokens.push_back(subject.substr(start, dot - start));
      if (dot == std::string::npos) break;
      start = dot + 1;
    }
    const uint64_t seq = tokens.size() > 5 ? std::stoull(tokens[5]) : 0;
    std::string payload(natsMsg_GetData(msg), static_cast<size_t>(natsMsg_GetDataLength(msg)));
    if (payload.empty()) payload = "+ACK";  // an empty body is an ack too
    {
      std::lock_guard lock(self->mutex_);
      self->seen_.emplace_back(seq, payload);
    }
    natsMsg_Destroy(msg);
  }

  natsSubscription* sub_ = nullptr;
  mutable std::mutex mutex_;
  std::vector<std::pair<uint64_t, std::string>> seen_;
};

// A server with the orders app's events stream, a connection and a publisher.
struct OrdersFixture {
  testing::NatsServer server;
  Config config = testing::test_config(server.url(), "orders");
  Connection connection{config};
  Publisher publisher{connection};
  testing::RawNats raw{server.url()};

  OrdersFixture() { Topology(connection).ensure_events_stream(); }

  PublishResult publish(const std::string& topic, const json& message, PublishOptions o = {}) {
    return publisher.publish(topic, message, o);
  }
  void publish_raw(const std::string& subject, const std::string& body) {
    jsPubAck* ack = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    REQUIRE(js_Publish(&ack, raw.js(), subject.c_str(), body.data(), static_cast<int>(body.size()), nullptr, &jerr) ==
            NATS_OK);
    jsPubAck_Destroy(ack);
  }
  std::vector<testing::StoredMessage> dead_letters() {
    try {
      return raw.read_stream(kDlq);
    } catch (const std::exception&) {
      return {};
    }
  }
};

}  // namespace

TEST_CASE("success: the handler sees the envelope and metadata, the message is acked once") {
  OrdersFixture f;
  AckTap acks(f.raw, kEvents, kCreatedDurable);
  std::mutex mutex;
  std::vector<Message> seen;
  std::atomic<int64_t> handled_at_ms{0};
  Consumer consumer(f.connection);
  // A long pull: a lone message must still reach the handler at once, not when the pull expires.
  consumer.subscribe("order.created", [&](const Message& m) {
    handled_at_ms = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now().time_since_epoch()).count();
    std::lock_guard lock(mutex);
    seen.push_back(m);
  }, {.ack_wait = Millis{600}, .fetch_timeout = Millis{1500}});
  consumer.start();
  CHECK(consumer.running());
  std::this_thread::sleep_for(100ms);  // the first pull is waiting on the server

  PublishOptions o;
  o.message_type = "OrderCreated";
  o.trace_id = "trace-7";
  o.headers["x-tenant"] = "acme";
  const auto published_at = Clock::now();
  auto r = f.publish("order.created", {{"order_id", 7}}, o);

  REQUIRE(wait_until([&] { return consumer.stats(kCreatedDurable).acked == 1; }, 5000ms));
  const auto latency = Clock::time_point(std::chrono::milliseconds(handled_at_ms.load())) - published_at;
  CHECK(latency < 500ms);
  std::this_thread::sleep_for(900ms);  // past ack_wait: an unconfirmed ack would show as a redelivery
  {
    std::lock_guard lock(mutex);
    REQUIRE(seen.size() == 1);
    const auto& m = seen[0];
    CHECK(m.envelope.event_id == r.event_id);
    CHECK(m.envelope.topic == "order.created");
    CHECK(m.envelope.message_type == "OrderCreated");
    CHECK(m.envelope.producer == "orders");
    CHECK(m.envelope.trace_id == "trace-7");
    CHECK(m.envelope.message["order_id"] == 7);
    CHECK(m.envelope.occurred_at != SystemTime{});
    CHECK(m.subject == "test.orders.order.created");
    CHECK(Envelope::decode(m.body).event_id == r.event_id);
    CHECK(m.header("x-tenant") == "acme");
    CHECK(m.header("TOPIC") == "order.created");
    CHECK(m.header("Nats-Msg-Id") == r.event_id);
    CHECK(m.metadata.stream == kEvents);
    CHECK(m.metadata.consumer == kCreatedDurable);
    CHECK(m.metadata.stream_sequence == r.sequence);
    CHECK(m.metadata.deliveries == 1);
    CHECK(m.metadata.pending == 0);
    CHECK(m.metadata.timestamp != SystemTime{});
    CHECK(m.max_attempts == 3);
    CHECK_FALSE(m.last_attempt());
  }
  CHECK(wait_until([&] { return acks.count("+ACK", r.sequence) == 1; }, 5000ms));  // the tap may lag (see below)
  CHECK(acks.count("-NAK") == 0);
  auto state = consumer_state(f.raw, kEvents, kCreatedDurable);
  CHECK(state.ack_pending == 0);
  CHECK(state.pending == 0);
  CHECK(state.redelivered == 0);
  CHECK(state.ack_floor == r.sequence);
  auto st = consumer.stats(kCreatedDurable);
  CHECK(st.subject == "test.orders.order.created");
  CHECK(st.stream == kEvents);
  CHECK(st.received == 1);
  CHECK(st.acked == 1);
  CHECK(st.retried == 0);
  CHECK(st.dead_lettered == 0);
  CHECK(st.in_flight == 0);
  CHECK(st.latency.count == 1);

  auto report = consumer.stop(Millis{2000});
  CHECK(report.within_deadline);
  CHECK_FALSE(consumer.running());
  CHECK(Topology(f.connection).consumer_exists(kEvents, kCreatedDurable));  // the durable stays
}

TEST_CASE("acked counts the server's answers: an ack nobody answers is an ack failure, not an ack") {
  OrdersFixture f;
  Consumer consumer(f.connection);
  std::atomic<int> handled{0};
  // The handler deletes the durable under itself: its ack then reaches no consumer, and the
  // server answers "no responders" instead of confirming it.
  consumer.subscribe("order.created", [&](const Message&) {
    if (handled++ == 0) {
      jsErrCode jerr = static_cast<jsErrCode>(0);
      REQUIRE(js_DeleteConsumer(f.raw.js(), kEvents, kCreatedDurable, nullptr, &jerr) == NATS_OK);
    }
  });
  consumer.start();
  f.publish("order.created", {{"order_id", 1}});
  REQUIRE(wait_until([&] { return consumer.stats(kCreatedDurable).ack_failures == 1; }, 5000ms));
  auto st = consumer.stats(kCreatedDurable);
  CHECK(handled == 1);
  CHECK(st.acked == 0);
  CHECK(st.ack_failures == 1);
  consumer.stop(Millis{2000});
}

TEST_CASE("after stop() every ack is answered: acked equals the server's ack floor") {
  OrdersFixture f;
  constexpr int kCount = 500;
  std::vector<OutgoingEvent> events;
  for (int i = 0; i < kCount; ++i) events.push_back(OutgoingEvent{"order.created", {{"order_id", i}}, {}});
  auto results = f.publisher.publish_batch(events);
  REQUIRE(std::all_of(results.begin(), results.end(), [](const auto& r) { return static_cast<bool>(r); }));
  Consumer consumer(f.connection);
  std::atomic<int> handled{0};
  consumer.subscribe("order.created", [&](const Message&) { handled++; }, {.concurrency = 8});
  consumer.start();
  REQUIRE(wait_until([&] { return handled.load() == kCount; }, 20000ms));
  consumer.stop(Millis{5000});  // returns once the answers to the last acks are in
  auto st = consumer.stats(kCreatedDurable);
  CHECK(st.acked == kCount);
  CHECK(st.ack_failures == 0);
  auto state = consumer_state(f.raw, kEvents, kCreatedDurable);
  CHECK(state.ack_pending == 0);
  CHECK(state.ack_floor == kCount);
}

TEST_CASE("a handler that fails twice then succeeds: 3 deliveries, spaced by the backoff delays") {
  OrdersFixture f;
  AckTap acks(f.raw, kEvents, kCreatedDurable);
  std::mutex mutex;
  std::vector<std::pair<Clock::time_point, uint64_t>> calls;
  Consumer consumer(f.connection);
  // The testing preset's schedule: 50 ms after the first failure, 100 ms after the second.
  consumer.subscribe("order.created", [&](const Message& m) {
    std::lock_guard lock(mutex);
    calls.emplace_back(Clock::now(), m.attempt());
    if (calls.size() <= 2) throw std::runtime_error("payment gateway timeout");
  });
  consumer.start();
  auto r = f.publish("order.created", {{"order_id", 1}});

  REQUIRE(wait_until([&] { return consumer.stats(kCreatedDurable).acked == 1; }, 5000ms));
  std::lock_guard lock(mutex);
  REQUIRE(calls.size() == 3);
  CHECK(calls[0].second == 1);
  CHECK(calls[1].second == 2);
  CHECK(calls[2].second == 3);
  const auto gap1 = calls[1].first - calls[0].first;
  const auto gap2 = calls[2].first - calls[1].first;
  CHECK(gap1 >= 50ms);
  CHECK(gap2 >= 100ms);
  // NAKed with a delay, not left to ack_wait (5 s in the testing preset).
  CHECK(gap1 < 2000ms);
  CHECK(gap2 < 2000ms);
  // The tap reads the acks on another connection: the server's answer to the consumer's ack can
  // come back before the tap has its copy.
  CHECK(wait_until([&] { return acks.count("+ACK", r.sequence) == 1; }, 5000ms));
  CHECK(acks.count("-NAK", r.sequence) == 2);
  auto naks = acks.payloads("-NAK");
  REQUIRE(naks.size() == 2);
  CHECK(json::parse(naks[0].substr(5))["delay"] == 50 * 1000000);  // the delay travels to the server in ns
  CHECK(json::parse(naks[1].substr(5))["delay"] == 100 * 1000000);
  auto st = consumer.stats(kCreatedDurable);
  CHECK(st.retried == 2);
  CHECK(st.handler_errors == 2);
  CHECK(st.dead_lettered == 0);
  CHECK(f.dead_letters().empty());
}

TEST_CASE("a permanent error goes to the DLQ at once with all four headers, then the original is terminated") {
  OrdersFixture f;
  AckTap acks(f.raw, kEvents, kCreatedDurable);
  std::atomic<int> calls{0};
  Consumer consumer(f.connection);
  consumer.subscribe("order.created", [&](const Message&) {
    calls++;
    throw PermanentError("order 7 has no customer");
  });
  consumer.start();
  PublishOptions o;
  o.headers["x-tenant"] = "acme";
  auto r = f.publish("order.created", {{"order_id", 7}}, o);

  REQUIRE(wait_until([&] { return consumer.stats(kCreatedDurable).dead_lettered == 1; }, 5000ms));
  REQUIRE(wait_until([&] { return acks.count("+TERM", r.sequence) == 1; }, 2000ms));
  std::this_thread::sleep_for(300ms);  // longer than the first backoff delay: no retry follows
  CHECK(calls == 1);
  CHECK(acks.count("-NAK") == 0);
  CHECK(acks.count("+ACK") == 0);

  auto original = f.raw.read_stream(kEvents);
  REQUIRE(original.size() == 1);
  auto dlq = f.dead_letters();
  REQUIRE(dlq.size() == 1);
  const auto& d = dlq[0];
  auto h = headers_of(d);
  CHECK(d.subject == "dlq.test.orders.test.orders.order.created");
  CHECK(d.msg_id == "dlq-test-orders-events-1-test-orders-test_orders_order_created");
  CHECK(d.data == original[0].data);
  CHECK(h["topic"] == "order.created");
  CHECK(h["x-tenant"] == "acme");
  CHECK(h["x-original-msg-id"] == r.event_id);
  CHECK(h["x-dead-letter"] == "true");
  CHECK(h["x-dlq-reason"] == "permanent_error");
  CHECK(h["x-deliveries"] == "1");
  REQUIRE(h.count("x-dlq-context") == 1);
  auto ctx = json::parse(h["x-dlq-context"]);
  CHECK(ctx["event_id"] == r.event_id);
  CHECK(ctx["reason"] == "permanent_error");
  CHECK(ctx["error_class"] == "natspubsub::PermanentError");
  CHECK(ctx["error_message"] == "order 7 has no customer");
  CHECK(ctx["deliveries"] == 1);
  CHECK(ctx["original_subject"] == "test.orders.order.created");
  CHECK(ctx["stream"] == kEvents);
  CHECK(ctx["sequence"] == r.sequence);
  CHECK(ctx["consumer"] == kCreatedDurable);
  CHECK(parse_timestamp(ctx["published_at"].get<std::string>()) <= now_ms());
  CHECK(base64_decode(ctx["raw_base64"].get<std::string>()) == original[0].data);

  REQUIRE(wait_until([&] { return consumer_state(f.raw, kEvents, kCreatedDurable).ack_pending == 0; }, 2000ms));
  CHECK(consumer_state(f.raw, kEvents, kCreatedDurable).pending == 0);
}

TEST_CASE("attempts exhausted: the DLQ has it with its reason and nothing is left pending") {
  OrdersFixture f;
  std::atomic<int> calls{0};
  Consumer consumer(f.connection);
  consumer.subscribe("order.created", [&](const Message&) {
    calls++;
    throw std::runtime_error("database is down");
  });
  consumer.start();
  auto r = f.publish("order.created", {{"order_id", 2}});

  REQUIRE(wait_until([&] { return consumer.stats(kCreatedDurable).dead_lettered == 1; }, 5000ms));
  std::this_thread::sleep_for(400ms);  // longer than any backoff delay: nothing else comes
  CHECK(calls == 3);
  auto dlq = f.dead_letters();
  REQUIRE(dlq.size() == 1);
  auto h = headers_of(dlq[0]);
  CHECK(h["x-dlq-reason"] == "attempts_exhausted");
  CHECK(h["x-deliveries"] == "3");
  auto ctx = json::parse(h["x-dlq-context"]);
  CHECK(ctx["error_class"] == "std::runtime_error");
  CHECK(ctx["error_message"] == "database is down");
  CHECK(ctx["event_id"] == r.event_id);
  auto state = consumer_state(f.raw, kEvents, kCreatedDurable);
  CHECK(state.ack_pending == 0);
  CHECK(state.pending == 0);
  auto st = consumer.stats(kCreatedDurable);
  CHECK(st.retried == 2);
  CHECK(st.handler_errors == 3);
  CHECK(st.in_flight == 0);
}

TEST_CASE("a body that is not an envelope goes to the DLQ as malformed; the next good message is processed") {
  OrdersFixture f;
  std::mutex mutex;
  std::vector<std::string> handled;
  Consumer consumer(f.connection);
  consumer.subscribe("order.created", [&](const Message& m) {
    std::lock_guard lock(mutex);
    handled.push_back(m.envelope.event_id);
  });
  consumer.start();
  f.publish_raw("test.orders.order.created", "this is not json");
  f.publish_raw("test.orders.order.created", R"({"hello":"world"})");
  auto good = f.publish("order.created", {{"order_id", 3}});

  REQUIRE(wait_until([&] { return consumer.stats(kCreatedDurable).acked == 1; }, 5000ms));
  REQUIRE(wait_until([&] { return consumer.stats(kCreatedDurable).dead_lettered == 2; }, 5000ms));
  {
    std::lock_guard lock(mutex);
    CHECK(handled == std::vector<std::string>{good.event_id});
  }
  auto dlq = f.dead_letters();
  REQUIRE(dlq.size() == 2);
  std::set<std::string> bodies;
  for (const auto& d : dlq) {
    auto h = headers_of(d);
    CHECK(h["x-dlq-reason"] == "malformed");
    CHECK(h["x-deliveries"] == "1");  // never retried
    auto ctx = json::parse(h["x-dlq-context"]);
    CHECK(ctx["error_class"] == "natspubsub::EnvelopeError");
    CHECK_FALSE(ctx["error_message"].get<std::string>().empty());
    CHECK(ctx["event_id"] == "");
    bodies.insert(d.data);
  }
  CHECK(bodies == std::set<std::string>{"this is not json", R"({"hello":"world"})"});
  auto st = consumer.stats(kCreatedDurable);
  CHECK(st.malformed == 2);
  CHECK(st.handler_errors == 0);
  CHECK(consumer_state(f.raw, kEvents, kCreatedDurable).ack_pending == 0);

  auto later = f.publish("order.created", {{"order_id", 4}});  // still running
  REQUIRE(wait_until([&] { return consumer.stats(kCreatedDurable).acked == 2; }, 5000ms));
  std::lock_guard lock(mutex);
  CHECK(handled.back() == later.event_id);
}

TEST_CASE("a handler that never returns within ack_wait: its next delivery past max_attempts is dead-lettered, not run") {
  OrdersFixture f;
  std::atomic<int> calls{0};
  Consumer consumer(f.connection);
  // In-progress signals stop after 50 ms, so to the server this handler is hung (or crashed).
  consumer.subscribe("order.created", [&](const Message& m) {
    calls++;
    const auto until = Clock::now() + 20s;
    while (!m.stop_token.stop_requested() && Clock::now() < until) std::this_thread::sleep_for(5ms);
    throw std::runtime_error("gave up");
  }, {.concurrency = 4, .max_attempts = 1, .ack_wait = Millis{300}, .max_in_progress = Millis{50}});
  consumer.start();
  auto r = f.publish("order.created", {{"order_id", 5}});

  REQUIRE(wait_until([&] { return !f.dead_letters().empty(); }, 10000ms));
  CHECK(calls == 1);  // delivery 2 is past max_attempts: dead-lettered before the handler
  auto dlq = f.dead_letters();
  REQUIRE(dlq.size() == 1);
  auto h = headers_of(dlq[0]);
  CHECK(h["x-dlq-reason"] == "max_deliveries");
  CHECK(h["x-deliveries"] == "2");
  auto ctx = json::parse(h["x-dlq-context"]);
  CHECK(ctx["event_id"] == r.event_id);
  CHECK(ctx["sequence"] == r.sequence);
  CHECK(ctx["stream"] == kEvents);
  CHECK(ctx["consumer"] == kCreatedDurable);
  CHECK(ctx["error_message"].get<std::string>().find("never gave a verdict") != std::string::npos);
  CHECK(dlq[0].data == f.raw.read_stream(kEvents)[0].data);
  CHECK(consumer.stats(kCreatedDurable).max_deliveries == 1);
  REQUIRE(wait_until([&] { return consumer_state(f.raw, kEvents, kCreatedDurable).ack_pending == 0; }, 2000ms));

  // The hung handler is told to give up at the stop deadline; what it reports after it is
  // ignored (its message was handed back), so no second dead letter appears.
  auto report = consumer.stop(Millis{200});
  CHECK(report.abandoned == 1);
  CHECK_FALSE(report.within_deadline);
  CHECK(f.dead_letters().size() == 1);
}

TEST_CASE("stop with 50 handlers running and 200 fetched: a second instance gets the rest at once, each exactly once") {
  OrdersFixture f;
  constexpr int kTotal = 300;
  std::vector<OutgoingEvent> events(kTotal);
  for (int i = 0; i < kTotal; ++i) events[i] = OutgoingEvent{"order.created", {{"n", i}}, {}};
  auto results = f.publisher.publish_batch(events);
  REQUIRE(std::all_of(results.begin(), results.end(), [](const auto& r) { return static_cast<bool>(r); }));

  std::mutex mutex;
  std::multiset<std::string> first_done, second_done;
  std::atomic<bool> release{false};
  // ack_wait is long: a message left unacknowledged would hold up the second instance for 30 s.
  SubscriptionOptions slow{.concurrency = 50, .prefetch = 150, .ack_wait = Millis{30000}};
  auto first = std::make_unique<Consumer>(f.connection);
  first->subscribe("order.created", [&](const Message& m) {
    const auto until = Clock::now() + 10s;
    while (!release && Clock::now() < until) std::this_thread::sleep_for(2ms);
    std::lock_guard lock(mutex);
    first_done.insert(m.envelope.event_id);
  }, slow);
  first->start();
  REQUIRE(wait_until([&] {
    auto s = first->stats(kCreatedDurable);
    return s.running == 50 && s.in_flight == 200;
  }, 10000ms));

  // Stop while all 50 handlers are busy; they may finish only once the 150 waiting messages
  // have been handed back, so the counts below are exact.
  StopReport report;
  std::thread stopper([&] { report = first->stop(Millis{5000}); });
  const bool handed_back = wait_until([&] { return first->stats(kCreatedDurable).nacked_on_stop == 150; }, 5000ms);
  release = true;
  stopper.join();
  const auto stopped_at = Clock::now();
  REQUIRE(handed_back);
  CHECK(report.within_deadline);
  CHECK(report.abandoned == 0);
  CHECK(report.finished == 50);
  CHECK(report.nacked_unstarted == 150);
  auto first_stats = first->stats(kCreatedDurable);
  CHECK(first_stats.acked == 50);
  CHECK(first_done.size() == 50);
  first.reset();

  Connection other(f.config);
  Consumer second(other);
  second.subscribe("order.created", [&](const Message& m) {
    std::lock_guard lock(mutex);
    second_done.insert(m.envelope.event_id);
  }, {.concurrency = 50, .ack_wait = Millis{30000}});
  second.start();
  REQUIRE(wait_until([&] {
    std::lock_guard lock(mutex);
    return first_done.size() + second_done.size() >= kTotal;
  }, 10000ms));
  CHECK(Clock::now() - stopped_at < 10s);  // well under ack_wait: nothing waited for it
  std::this_thread::sleep_for(200ms);
  std::lock_guard lock(mutex);
  std::set<std::string> all;
  for (const auto& r : results) all.insert(r.event_id);
  std::set<std::string> done(first_done.begin(), first_done.end());
  done.insert(second_done.begin(), second_done.end());
  CHECK(done == all);
  CHECK(first_done.size() + second_done.size() == kTotal);  // nobody handled twice
  CHECK(std::set<std::string>(second_done.begin(), second_done.end()).size() == second_done.size());
  CHECK(consumer_state(f.raw, kEvents, kCreatedDurable).ack_pending == 0);
}

TEST_CASE("two instances on one durable share 10,000 messages; none is handled twice") {
  OrdersFixture f;
  constexpr int kTotal = 10000;
  std::vector<OutgoingEvent> events(kTotal);
  for (int i = 0; i < kTotal; ++i) events[i] = OutgoingEvent{"order.created", {{"n", i}}, {}};
  auto results = f.publisher.publish_batch(events);
  REQUIRE(std::count_if(results.begin(), results.end(), [](const auto& r) { return static_cast<bool>(r); }) == kTotal);

  std::mutex mutex;
  std::set<std::string> seen;
  std::atomic<int> duplicates{0};
  std::atomic<int> by_a{0}, by_b{0};
  auto handler = [&](std::atomic<int>& mine) {
    return [&](const Message& m) {
      mine++;
      std::lock_guard lock(mutex);
      if (!seen.insert(m.envelope.event_id).second) duplicates++;
    };
  };
  Connection conn_b(f.config);
  Consumer a(f.connection);
  Consumer b(conn_b);
  a.subscribe("order.created", handler(by_a), {.concurrency = 8});
  b.subscribe("order.created", handler(by_b), {.concurrency = 8});
  a.start();
  b.start();
  REQUIRE(wait_until([&] {
    std::lock_guard lock(mutex);
    return seen.size() == kTotal;
  }, 60000ms));
  REQUIRE(wait_until([&] { return a.stats(kCreatedDurable).acked + b.stats(kCreatedDurable).acked == kTotal; }, 5000ms));
  CHECK(duplicates == 0);
  CHECK(by_a + by_b == kTotal);
  CHECK(by_a > 0);  // the load was shared
  CHECK(by_b > 0);
  MESSAGE("instance a handled " << by_a.load() << ", instance b " << by_b.load());
  auto state = consumer_state(f.raw, kEvents, kCreatedDurable);
  CHECK(state.ack_pending == 0);
  CHECK(state.pending == 0);
  CHECK(state.redelivered == 0);
}

TEST_CASE("a wildcard of this app's topics, and another app's subject with its own DLQ") {
  OrdersFixture f;
  std::mutex mutex;
  std::vector<std::string> wildcard_topics;
  Consumer orders(f.connection);
  orders.subscribe("order.*", [&](const Message& m) {
    std::lock_guard lock(mutex);
    wildcard_topics.push_back(m.envelope.topic);
  });
  orders.start();

  Connection billing_conn(testing::test_config(f.server.url(), "billing"));
  std::atomic<int> billing_calls{0};
  Consumer billing(billing_conn);
  billing.subscribe_subject("test.orders.order.created", [&](const Message& m) {
    billing_calls++;
    CHECK(m.envelope.producer == "orders");
    throw PermanentError("no account for this customer");
  });
  billing.start();

  auto created = f.publish("order.created", {{"id", 1}});
  f.publish("order.cancelled", {{"id", 1}});
  f.publish("invoice.sent", {{"id", 1}});

  REQUIRE(wait_until([&] { return orders.stats("test-orders-test_orders_order_any").acked == 2; }, 5000ms));
  REQUIRE(wait_until([&] { return billing.stats("test-billing-test_orders_order_created").dead_lettered == 1; },
                     5000ms));
  std::this_thread::sleep_for(200ms);
  {
    std::lock_guard lock(mutex);
    std::sort(wildcard_topics.begin(), wildcard_topics.end());
    CHECK(wildcard_topics == std::vector<std::string>{"order.cancelled", "order.created"});
  }
  CHECK(billing_calls == 1);
  CHECK(orders.stats("test-orders-test_orders_order_any").stream == kEvents);
  CHECK(billing.stats("test-billing-test_orders_order_created").stream == kEvents);  // on the publisher's stream
  auto dlq = f.raw.read_stream("test-billing-dlq");
  REQUIRE(dlq.size() == 1);
  CHECK(dlq[0].subject == "dlq.test.billing.test.orders.order.created");
  auto ctx = json::parse(headers_of(dlq[0])["x-dlq-context"]);
  CHECK(ctx["event_id"] == created.event_id);
  CHECK(ctx["consumer"] == "test-billing-test_orders_order_created");
  CHECK(f.dead_letters().empty());  // the orders app's own DLQ is untouched
}

namespace {
struct NotAnException {
  int code = 7;
};
}  // namespace

TEST_CASE("a handler exception of any type never kills the runtime") {
  OrdersFixture f;
  std::atomic<int> ok{0};
  Consumer consumer(f.connection);
  consumer.use([](const Message& m, const Next& next) {
    if (m.envelope.message.value("kind", "") == "middleware") throw std::logic_error("middleware bug");
    next(m);
  });
  consumer.subscribe("order.created", [&](const Message& m) {
    const auto kind = m.envelope.message.value("kind", "");
    if (kind == "int") throw 42;
    if (kind == "string") throw std::string("a string");
    if (kind == "struct") throw NotAnException{};
    if (kind == "bad_alloc") throw std::bad_alloc();
    if (kind == "pointer") throw "a C string";
    ok++;
  });
  consumer.start();
  std::map<std::string, uint64_t> seq_of;
  for (const char* kind : {"int", "string", "struct", "bad_alloc", "pointer", "middleware"})
    seq_of[kind] = f.publish("order.created", {{"kind", kind}}).sequence;
  f.publish("order.created", {{"kind", "fine"}});

  REQUIRE(wait_until([&] { return consumer.stats(kCreatedDurable).dead_lettered == 6; }, 10000ms));
  REQUIRE(wait_until([&] { return ok == 1; }, 5000ms));
  CHECK(consumer.running());
  auto st = consumer.stats(kCreatedDurable);
  CHECK(st.handler_errors == 18);  // 6 kinds x 3 attempts
  CHECK(st.acked == 1);
  std::map<uint64_t, std::string> class_of;
  for (const auto& d : f.dead_letters()) {
    auto ctx = json::parse(headers_of(d)["x-dlq-context"]);
    CHECK(ctx["reason"] == "attempts_exhausted");
    class_of[ctx["sequence"].get<uint64_t>()] = ctx["error_class"].get<std::string>();
  }
  CHECK(class_of[seq_of["int"]] == "int");
  CHECK(class_of[seq_of["string"]].find("basic_string") != std::string::npos);
  CHECK(class_of[seq_of["struct"]].find("NotAnException") != std::string::npos);
  CHECK(class_of[seq_of["bad_alloc"]] == "std::bad_alloc");
  CHECK(class_of[seq_of["pointer"]] == "char const*");
  CHECK(class_of[seq_of["middleware"]] == "std::logic_error");

  f.publish("order.created", {{"kind", "fine"}});  // and it keeps going
  REQUIRE(wait_until([&] { return ok == 2; }, 5000ms));
}

TEST_CASE("error policy: discard rules ack and log, dead-letter rules skip the retries") {
  OrdersFixture f;
  std::mutex mutex;
  std::map<std::string, int> calls;
  ErrorPolicy policy;
  policy.discard_on<std::out_of_range>()
      .dead_letter_on<std::invalid_argument>()
      .add_rule([](const HandlerFailure& failure, const Message& m) -> std::optional<Verdict> {
        if (m.header("x-drop") == "yes") return Verdict::discard;
        if (failure.message == "boom") throw std::runtime_error("a broken rule is skipped");
        return std::nullopt;
      });
  Consumer consumer(f.connection);
  consumer.subscribe("order.created", [&](const Message& m) {
    const auto kind = m.envelope.message.value("kind", "");
    {
      std::lock_guard lock(mutex);
      calls[kind]++;
    }
    if (kind == "stale") throw std::out_of_range("order already shipped");
    if (kind == "invalid") throw std::invalid_argument("amount is negative");
    if (kind == "dropped") throw std::runtime_error("dropped by header");
    if (kind == "permanent") throw PermanentError("boom");
  }, {.error_policy = policy});
  consumer.start();
  PublishOptions drop;
  drop.headers["x-drop"] = "yes";
  f.publish("order.created", {{"kind", "stale"}});
  f.publish("order.created", {{"kind", "invalid"}});
  f.publish("order.created", {{"kind", "dropped"}}, drop);
  f.publish("order.created", {{"kind", "permanent"}});

  REQUIRE(wait_until([&] {
    auto s = consumer.stats(kCreatedDurable);
    return s.discarded == 2 && s.dead_lettered == 2;
  }, 5000ms));
  std::this_thread::sleep_for(300ms);
  {
    std::lock_guard lock(mutex);
    CHECK(calls["stale"] == 1);
    CHECK(calls["invalid"] == 1);
    CHECK(calls["dropped"] == 1);
    CHECK(calls["permanent"] == 1);
  }
  std::set<std::string> reasons;
  for (const auto& d : f.dead_letters()) reasons.insert(headers_of(d)["x-dlq-reason"]);
  CHECK(reasons == std::set<std::string>{"permanent_error"});
  CHECK(f.dead_letters().size() == 2);
  CHECK(consumer.stats(kCreatedDurable).retried == 0);
  auto state = consumer_state(f.raw, kEvents, kCreatedDurable);
  CHECK(state.ack_pending == 0);
}

TEST_CASE("a long handler keeps its message with in-progress signals; no redelivery") {
  OrdersFixture f;
  AckTap acks(f.raw, kEvents, kCreatedDurable);
  std::atomic<int> calls{0};
  Consumer consumer(f.connection);
  consumer.subscribe("order.created", [&](const Message&) {
    calls++;
    std::this_thread::sleep_for(1500ms);  // five times ack_wait
  }, {.ack_wait = Millis{300}});
  consumer.start();
  auto r = f.publish("order.created", {{"id", 1}});
  REQUIRE(wait_until([&] { return consumer.stats(kCreatedDurable).acked == 1; }, 5000ms));
  std::this_thread::sleep_for(500ms);
  CHECK(calls == 1);
  CHECK(acks.count("+WPI", r.sequence) >= 4);
  CHECK(consumer_state(f.raw, kEvents, kCreatedDurable).redelivered == 0);
}

TEST_CASE("middleware: order, W3C trace propagation, metrics") {
  OrdersFixture f;
  std::mutex mutex;
  std::vector<std::string> order;
  std::vector<std::optional<TraceContext>> traces;
  HandlerMetrics metrics;
  std::vector<HandlerObservation> observed;
  Consumer consumer(f.connection);
  consumer.use(middleware::trace_context())
      .use(middleware::logging(spdlog::level::info))
      .use(metrics.middleware())
      .use(middleware::metrics([&](const HandlerObservation& o) {
        std::lock_guard lock(mutex);
        observed.push_back(o);
      }))
      .use([&](const Message& m, const Next& next) {
        {
          std::lock_guard lock(mutex);
          order.push_back("outer-before");
        }
        next(m);
        std::lock_guard lock(mutex);
        order.push_back("outer-after");
      });
  SubscriptionOptions o;
  o.concurrency = 1;
  o.middleware.push_back([&](const Message& m, const Next& next) {
    {
      std::lock_guard lock(mutex);
      order.push_back("subscription");
    }
    next(m);
  });
  consumer.subscribe("order.created", [&](const Message& m) {
    std::lock_guard lock(mutex);
    order.push_back("handler");
    traces.push_back(current_trace());
    if (m.envelope.message.value("fail", false)) throw std::domain_error("no");
  }, o);
  consumer.start();

  const std::string parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
  PublishOptions with_parent;
  with_parent.traceparent = parent;
  f.publish("order.created", {{"n", 1}}, with_parent);
  REQUIRE(wait_until([&] { return consumer.stats(kCreatedDurable).acked == 1; }, 5000ms));
  PublishOptions with_trace_id;
  with_trace_id.trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
  f.publish("order.created", {{"n", 2}}, with_trace_id);
  f.publish("order.created", {{"n", 3}, {"fail", true}});
  REQUIRE(wait_until([&] { return consumer.stats(kCreatedDurable).dead_lettered == 1; }, 5000ms));

  std::lock_guard lock(mutex);
  REQUIRE(order.size() >= 4);
  CHECK(std::vector<std::string>(order.begin(), order.begin() + 4) ==
        std::vector<std::string>{"outer-before", "subscription", "handler", "outer-after"});
  REQUIRE(traces.size() == 5);  // 1 + 1 + 3 attempts
  REQUIRE(traces[0].has_value());
  CHECK(traces[0]->trace_id == "0af7651916cd43dd8448eb211c80319c");
  CHECK(traces[0]->parent_span_id == "b7ad6b7169203331");
  CHECK(traces[0]->span_id != "b7ad6b7169203331");
  CHECK(traces[0]->span_id.size() == 16);
  CHECK(TraceContext::parse(traces[0]->traceparent()).has_value());
  REQUIRE(traces[1].has_value());
  CHECK(traces[1]->trace_id == "4bf92f3577b34da6a3ce929d0e0e4736");
  REQUIRE(traces[2].has_value());
  CHECK(traces[2]->trace_id.size() == 32);  // a new trace when none came in
  CHECK_FALSE(current_trace().has_value());  // nothing leaks outside a handler

  auto snap = metrics.snapshot();
  REQUIRE(snap.count(kCreatedDurable) == 1);
  CHECK(snap[kCreatedDurable].calls == 5);
  CHECK(snap[kCreatedDurable].failures == 3);
  CHECK(snap[kCreatedDurable].failures_by_class["std::domain_error"] == 3);
  CHECK(snap[kCreatedDurable].latency.count == 5);
  REQUIRE(observed.size() == 5);
  CHECK(observed[0].ok);
  CHECK(observed[0].subject == "test.orders.order.created");
  CHECK(observed[0].deliveries == 1);
  CHECK_FALSE(observed[4].ok);
  CHECK(observed[4].deliveries == 3);
  CHECK(observed[4].error_class == "std::domain_error");
}

// Acks are pipelined: a worker frees its slot once its ack is sent, so for one round trip the
// server may still count an acked message as pending while the slot's next message is out. The
// bound on the server is therefore slots + acks in flight (at most 2 x slots); what the runtime
// itself holds never exceeds the slots.
TEST_CASE("backpressure: no more messages fetched than free workers; the server's count stays bounded") {
  OrdersFixture f;
  std::atomic<int> running{0}, max_running{0}, done{0};
  Consumer consumer(f.connection);
  consumer.subscribe("order.created", [&](const Message&) {
    const int now = ++running;
    int seen = max_running.load();
    while (now > seen && !max_running.compare_exchange_weak(seen, now)) {
    }
    std::this_thread::sleep_for(30ms);
    running--;
    done++;
  }, {.concurrency = 3});
  for (int i = 0; i < 40; ++i) f.publish("order.created", {{"n", i}});
  consumer.start();
  uint64_t max_ack_pending = 0;
  uint64_t max_in_flight = 0;
  const auto until = Clock::now() + 15s;
  while (done < 40 && Clock::now() < until) {
    max_ack_pending = std::max(max_ack_pending, consumer_state(f.raw, kEvents, kCreatedDurable).ack_pending);
    max_in_flight = std::max(max_in_flight, consumer.stats(kCreatedDurable).in_flight);
    std::this_thread::sleep_for(3ms);
  }
  CHECK(done == 40);
  CHECK(max_running == 3);
  CHECK(max_in_flight >= 1);
  CHECK(max_in_flight <= 3);  // fetched and not finished: never more than the workers
  CHECK(max_ack_pending >= 1);
  CHECK(max_ack_pending <= 6);  // the workers' messages + acks still on their way
  CHECK(consumer.stats(kCreatedDurable).received == 40);
}

TEST_CASE("attempts survive a restart: the delivery count comes from the server") {
  OrdersFixture f;
  std::atomic<int> first_calls{0};
  // The retry delay outlasts the first instance's stop, so the second one gets delivery 2.
  SubscriptionOptions o{.max_attempts = 2, .backoff = Backoff::list({Millis{1000}})};
  auto first = std::make_unique<Consumer>(f.connection);
  first->subscribe("order.created", [&](const Message&) {
    first_calls++;
    throw std::runtime_error("first instance fails");
  }, o);
  first->start();
  auto r = f.publish("order.created", {{"id", 1}});
  REQUIRE(wait_until([&] { return first->stats(kCreatedDurable).retried == 1; }, 5000ms));
  first->stop(Millis{1000});
  first.reset();

  std::vector<uint64_t> deliveries;
  std::mutex mutex;
  Consumer second(f.connection);
  second.subscribe("order.created", [&](const Message& m) {
    {
      std::lock_guard lock(mutex);
      deliveries.push_back(m.attempt());
    }
    throw std::runtime_error("second instance fails too");
  }, o);
  second.start();
  REQUIRE(wait_until([&] { return second.stats(kCreatedDurable).dead_lettered == 1; }, 5000ms));
  CHECK(first_calls == 1);
  std::lock_guard lock(mutex);
  CHECK(deliveries == std::vector<uint64_t>{2});
  auto h = headers_of(f.dead_letters().at(0));
  CHECK(h["x-dlq-reason"] == "attempts_exhausted");
  CHECK(h["x-deliveries"] == "2");
  CHECK(json::parse(h["x-dlq-context"])["event_id"] == r.event_id);
}

TEST_CASE("when the DLQ publish fails the message is NAKed, not lost, and dead-lettered once the DLQ is back") {
  OrdersFixture f;
  std::atomic<int> calls{0};
  Consumer consumer(f.connection, ConsumerOptions{.ensure_topology = false});
  consumer.subscribe("order.created", [&](const Message&) {
    calls++;
    throw PermanentError("cannot ever work");
  }, {.max_attempts = 5, .backoff = Backoff::list({Millis{300}})});
  consumer.start();  // no DLQ stream exists yet
  f.publish("order.created", {{"id", 1}});
  REQUIRE(wait_until([&] { return consumer.stats(kCreatedDurable).dlq_failures >= 1; }, 5000ms));
  CHECK(consumer.stats(kCreatedDurable).dead_lettered == 0);
  Topology(f.connection).ensure_dlq_stream();
  REQUIRE(wait_until([&] { return consumer.stats(kCreatedDurable).dead_lettered == 1; }, 5000ms));
  CHECK(calls == 1);  // the redeliveries retried the letter, not the handler
  CHECK(f.dead_letters().size() == 1);
  CHECK(headers_of(f.dead_letters().at(0))["x-dlq-reason"] == "permanent_error");
  REQUIRE(wait_until([&] { return consumer_state(f.raw, kEvents, kCreatedDurable).ack_pending == 0; }, 2000ms));
}

TEST_CASE("registration errors are reported before anything runs") {
  OrdersFixture f;
  Consumer consumer(f.connection);
  auto noop = [](const Message&) {};
  CHECK_THROWS_AS(consumer.subscribe("bad topic", noop), SubjectError);
  CHECK_THROWS_AS(consumer.subscribe("", noop), SubjectError);
  CHECK_THROWS_AS(consumer.subscribe("order.created", Handler{}), ConfigError);
  CHECK_THROWS_AS(consumer.start(), ConfigError);  // nothing subscribed
  consumer.subscribe("order.created", noop);
  CHECK_THROWS_AS(consumer.subscribe_subject("test.orders.order.created", noop), ConfigError);  // same durable
  CHECK_THROWS_AS(consumer.stats("nope"), ConfigError);

  Consumer bad(f.connection);
  bad.subscribe("order.created", noop, {.max_attempts = 5, .max_deliver = 5});
  CHECK_THROWS_AS(bad.start(), ConfigError);
  CHECK_FALSE(bad.running());
  Consumer too_small(f.connection);
  too_small.subscribe("order.created", noop, {.concurrency = 10, .max_ack_pending = 5});
  CHECK_THROWS_AS(too_small.start(), ConfigError);
  Consumer other_stream(f.connection);
  other_stream.subscribe_subject("test.nobody.thing", noop);
  CHECK_THROWS_AS(other_stream.start(), TopologyError);  // no stream captures it

  consumer.start();
  CHECK_THROWS_AS(consumer.start(), Error);
  CHECK_THROWS_AS(consumer.subscribe("order.cancelled", noop), Error);
  CHECK(consumer.stop(Millis{1000}).within_deadline);
  CHECK(consumer.stop(Millis{1000}).nacked_unstarted == 0);  // twice is fine
}
