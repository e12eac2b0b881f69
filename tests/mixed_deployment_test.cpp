// ctest-labels: integration
// A deployment shared with the NatsPubsub JavaScript/Ruby libraries (issue 14), in the
// natspubsub topology mode. NatsPubsub's side is reproduced on the wire with raw cnats calls,
// shaped as its source does it (github.com/attaradev/nats-pubsub, packages/javascript):
//   - topology/topology-manager.ts: stream "{env}-events-stream", looked up and created only
//     when missing, subjects "{env}.events.>" and "{env}.{app}.>", limits retention, max age
//     7 days, file storage, 1 replica, discard old; duplicate window left to the server (2 min);
//   - subscribers/consumer.ts: durable "{app}_{subject with '.', '*', '>' -> '_'}", explicit
//     ack, deliver all, replay instant, filter = the subject, max_deliver 5, ack_wait 30 s,
//     max_ack_pending = concurrency (10); pull consumption, one plain ack per message;
//   - publisher/publisher.ts + envelope-builder.ts: headers Nats-Msg-Id, topic and trace_id,
//     envelope {event_id, schema_version 1, topic, producer, occurred_at, trace_id, message}.
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <doctest/doctest.h>
#include <nats/nats.h>
#include <nlohmann/json.hpp>

#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/middleware.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/topology.hpp>

#include "support/eventually.hpp"
#include "support/nats_helpers.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;

namespace {

constexpr int64_t kNanosPerMilli = 1000000;
constexpr int64_t kSevenDaysNs = 7LL * 24 * 3600 * 1000 * kNanosPerMilli;

Config mixed_config(const std::string& url, const std::string& app) {
  auto c = testing::test_config(url, app, "acc");
  c.topology = TopologyMode::natspubsub;
  return c;
}

// The stream as NatsPubsub's TopologyManager.ensureMainStream leaves it: looked up, created
// when missing, otherwise left alone. Returns the JetStream error code (0 on success).
int natspubsub_setup(testing::RawNats& raw, const std::string& env, const std::string& app) {
  const std::string name = env + "-events-stream";
  jsStreamInfo* si = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_GetStreamInfo(&si, raw.js(), name.c_str(), nullptr, &jerr);
  jsStreamInfo_Destroy(si);
  if (s == NATS_OK) return 0;
  if (s != NATS_NOT_FOUND && jerr != JSStreamNotFoundErr) return static_cast<int>(jerr == 0 ? -1 : jerr);

  const std::string events = env + ".events.>";
  const std::string topics = env + "." + app + ".>";
  const char* subjects[] = {events.c_str(), topics.c_str()};
  jsStreamConfig cfg;
  jsStreamConfig_Init(&cfg);
  cfg.Name = name.c_str();
  cfg.Subjects = subjects;
  cfg.SubjectsLen = 2;
  cfg.Retention = js_LimitsPolicy;
  cfg.MaxAge = kSevenDaysNs;
  cfg.Storage = js_FileStorage;
  cfg.Replicas = 1;
  cfg.Discard = js_DiscardOld;
  si = nullptr;
  jerr = static_cast<jsErrCode>(0);
  s = js_AddStream(&si, raw.js(), &cfg, nullptr, &jerr);
  jsStreamInfo_Destroy(si);
  if (s == NATS_OK) return 0;
  return static_cast<int>(jerr == 0 ? -1 : jerr);
}

std::string natspubsub_durable(const std::string& app, const std::string& subject) {
  std::string out = app + "_";
  for (char c : subject) out += (c == '.' || c == '*' || c == '>') ? '_' : c;
  return out;
}

// The durable with NatsPubsub's consumer settings (its defaults: maxDeliver 5, ackWait 30 s,
// concurrency 10).
void natspubsub_durable_setup(testing::RawNats& raw, const std::string& stream, const std::string& app,
                              const std::string& subject) {
  const std::string durable = natspubsub_durable(app, subject);
  jsConsumerConfig cfg;
  jsConsumerConfig_Init(&cfg);
  cfg.Durable = durable.c_str();
  cfg.AckPolicy = js_AckExplicit;
  cfg.DeliverPolicy = js_DeliverAll;
  cfg.ReplayPolicy = js_ReplayInstant;
  cfg.FilterSubject = subject.c_str();
  cfg.MaxDeliver = 5;
  cfg.AckWait = 30000 * kNanosPerMilli;
  cfg.MaxAckPending = 10;
  jsConsumerInfo* ci = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_AddConsumer(&ci, raw.js(), stream.c_str(), &cfg, nullptr, &jerr);
  jsConsumerInfo_Destroy(ci);
  REQUIRE_MESSAGE(s == NATS_OK, "NatsPubsub-shaped durable " << durable << ": " << jerr);
}

// One event as NatsPubsub's Publisher.publishToTopic sends it.
void natspubsub_publish(testing::RawNats& raw, const std::string& env, const std::string& app,
                        const std::string& topic, const std::string& event_id, const nlohmann::json& message,
                        const std::string& trace_id = "") {
  nlohmann::json envelope{{"event_id", event_id},   {"schema_version", 1}, {"topic", topic},
                          {"producer", app},        {"occurred_at", "2026-12-01T10:00:00.000Z"},
                          {"message", message}};
  if (!trace_id.empty()) envelope["trace_id"] = trace_id;
  const std::string body = envelope.dump();
  const std::string subject = env + "." + app + "." + topic;
  natsMsg* msg = nullptr;
  REQUIRE(natsMsg_Create(&msg, subject.c_str(), nullptr, body.data(), static_cast<int>(body.size())) == NATS_OK);
  natsMsgHeader_Set(msg, "Nats-Msg-Id", event_id.c_str());
  natsMsgHeader_Set(msg, "topic", topic.c_str());
  if (!trace_id.empty()) natsMsgHeader_Set(msg, "trace_id", trace_id.c_str());
  jsPubAck* ack = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_PublishMsg(&ack, raw.js(), msg, nullptr, &jerr);
  jsPubAck_Destroy(ack);
  natsMsg_Destroy(msg);
  REQUIRE_MESSAGE(s == NATS_OK, "publish " << subject << ": " << jerr);
}

struct StreamShape {
  std::vector<std::string> subjects;
  jsRetentionPolicy retention = js_LimitsPolicy;
  jsStorageType storage = js_FileStorage;
  int64_t max_age = 0;
  int64_t max_bytes = 0;
  int64_t max_msgs = 0;
  int64_t duplicates = 0;
  int64_t replicas = 0;
  jsDiscardPolicy discard = js_DiscardOld;
};

StreamShape shape_of(testing::RawNats& raw, const std::string& name) {
  jsStreamInfo* si = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_GetStreamInfo(&si, raw.js(), name.c_str(), nullptr, &jerr);
  REQUIRE_MESSAGE(s == NATS_OK, "stream " << name << ": " << jerr);
  StreamShape out;
  for (int i = 0; i < si->Config->SubjectsLen; ++i) out.subjects.emplace_back(si->Config->Subjects[i]);
  out.retention = si->Config->Retention;
  out.storage = si->Config->Storage;
  out.max_age = si->Config->MaxAge;
  out.max_bytes = si->Config->MaxBytes;
  out.max_msgs = si->Config->MaxMsgs;
  out.duplicates = si->Config->Duplicates;
  out.replicas = si->Config->Replicas;
  out.discard = si->Config->Discard;
  jsStreamInfo_Destroy(si);
  return out;
}

// Nothing a later setup did may weaken what an earlier one made: subjects only added, limits,
// storage, retention, replicas and discard as they were, the duplicate window never shorter.
void check_not_weakened(const StreamShape& before, const StreamShape& after) {
  for (const auto& s : before.subjects) CHECK_MESSAGE(std::count(after.subjects.begin(), after.subjects.end(), s) == 1, s);
  CHECK(after.retention == before.retention);
  CHECK(after.storage == before.storage);
  CHECK(after.max_age == before.max_age);
  CHECK(after.max_bytes == before.max_bytes);
  CHECK(after.max_msgs == before.max_msgs);
  CHECK(after.replicas == before.replicas);
  CHECK(after.discard == before.discard);
  CHECK(after.duplicates >= before.duplicates);
}

struct ConsumerShape {
  std::string filter;
  jsAckPolicy ack_policy = js_AckExplicit;
  jsDeliverPolicy deliver_policy = js_DeliverAll;
  int64_t max_deliver = 0;
  int64_t ack_wait = 0;
  int64_t max_ack_pending = 0;
};

ConsumerShape consumer_shape(testing::RawNats& raw, const std::string& stream, const std::string& durable) {
  jsConsumerInfo* ci = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_GetConsumerInfo(&ci, raw.js(), stream.c_str(), durable.c_str(), nullptr, &jerr);
  REQUIRE_MESSAGE(s == NATS_OK, "consumer " << durable << ": " << jerr);
  ConsumerShape out;
  out.filter = ci->Config->FilterSubject != nullptr ? ci->Config->FilterSubject : "";
  out.ack_policy = ci->Config->AckPolicy;
  out.deliver_policy = ci->Config->DeliverPolicy;
  out.max_deliver = ci->Config->MaxDeliver;
  out.ack_wait = ci->Config->AckWait;
  out.max_ack_pending = ci->Config->MaxAckPending;
  jsConsumerInfo_Destroy(ci);
  return out;
}

}  // namespace

TEST_CASE("topology mode: JSON key, environment variable, default unchanged") {
  CHECK(Config::testing("billing").topology == TopologyMode::standard);
  auto c = Config::from_json(nlohmann::json::parse(R"({"app":"billing","topology":"natspubsub"})"));
  CHECK(c.topology == TopologyMode::natspubsub);
  CHECK(c.to_json()["topology"] == "natspubsub");
  CHECK(Config::from_json(c.to_json()).topology == TopologyMode::natspubsub);
  try {
    (void)Config::from_json(nlohmann::json::parse(R"({"app":"billing","topology":"NatsPubSub-js"})"));
    FAIL("unknown mode accepted");
  } catch (const ConfigError& e) {
    CHECK(e.field() == "topology");
  }
  CHECK_THROWS_AS((void)Config::from_json(nlohmann::json::parse(R"({"app":"b","topology":1})")), ConfigError);

  ::setenv("NATSPUBSUB_TOPOLOGY", "natspubsub", 1);
  CHECK(Config::from_env(Config::testing("billing")).topology == TopologyMode::natspubsub);
  ::setenv("NATSPUBSUB_TOPOLOGY", "per-app", 1);
  CHECK_THROWS_AS((void)Config::from_env(Config::testing("billing")), ConfigError);
  ::unsetenv("NATSPUBSUB_TOPOLOGY");
  CHECK(Config::from_env(Config::testing("billing")).topology == TopologyMode::standard);
}

TEST_CASE("natspubsub mode names: NatsPubsub's stream and durables") {
  auto c = Config::testing("billing");
  c.env = "acc";
  CHECK(c.events_stream_name() == "acc-billing-events");
  CHECK(Topology::consumer_name(c, "acc.orders.order.created") == "acc-billing-acc_orders_order_created");
  c.topology = TopologyMode::natspubsub;
  CHECK(c.events_stream_name() == "acc-events-stream");
  CHECK(Topology::consumer_name(c, "acc.orders.order.created") == "billing_acc_orders_order_created");
  CHECK(Topology::consumer_name(c, "acc.orders.>") == "billing_acc_orders__");
  CHECK(Topology::consumer_name(c, "acc.*.order.created") == "billing_acc___order_created");
  for (const char* filter : {"acc.orders.order.created", "acc.orders.>", "acc.*.order-x.created"})
    CHECK(Topology::consumer_name(c, filter) == natspubsub_durable("billing", filter));
  auto spec = Topology::events_stream_spec(c);
  CHECK(spec.name == "acc-events-stream");
  CHECK(spec.subjects == std::vector<std::string>{"acc.events.>", "acc.billing.>"});
  CHECK(spec.retention == Retention::limits);
  CHECK(Topology::consumer_spec(c, "acc.orders.order.created").adopt_existing);
  c.topology = TopologyMode::standard;
  CHECK_FALSE(Topology::consumer_spec(c, "acc.orders.order.created").adopt_existing);
}

TEST_CASE("the default mode still blocks NatsPubsub (the issue's first bug, kept as the reason for the mode)") {
  testing::NatsServer server;
  testing::RawNats raw(server.url());
  auto config = testing::test_config(server.url(), "orders", "acc");
  Connection c(config);
  CHECK(Topology(c).ensure_events_stream().stream == "acc-orders-events");
  CHECK(natspubsub_setup(raw, "acc", "orders") == JSStreamSubjectOverlapErr);
}

TEST_CASE("C++ first, then NatsPubsub's setup: both succeed, the stream is not weakened") {
  testing::NatsServer server;
  testing::RawNats raw(server.url());
  Connection orders(mixed_config(server.url(), "orders"));
  auto created = Topology(orders).ensure_events_stream();
  CHECK(created.action == EnsureAction::created);
  CHECK(created.stream == "acc-events-stream");
  CHECK(created.subjects == std::vector<std::string>{"acc.events.>", "acc.orders.>"});
  const auto before = shape_of(raw, "acc-events-stream");

  // NatsPubsub instances of the same app and of another app start now.
  CHECK(natspubsub_setup(raw, "acc", "orders") == 0);
  CHECK(natspubsub_setup(raw, "acc", "shipping") == 0);
  auto after = shape_of(raw, "acc-events-stream");
  check_not_weakened(before, after);
  CHECK(after.subjects == before.subjects);  // NatsPubsub never edits a stream it finds

  // A second C++ app joins: its subjects are added, nothing else moves, the guard lets it pass.
  Connection billing(mixed_config(server.url(), "billing"));
  auto joined = Topology(billing).ensure_events_stream();
  CHECK(joined.action == EnsureAction::updated);
  CHECK(joined.stream == "acc-events-stream");
  auto extended = shape_of(raw, "acc-events-stream");
  check_not_weakened(after, extended);
  CHECK(std::count(extended.subjects.begin(), extended.subjects.end(), "acc.billing.>") == 1);
  CHECK(Topology(billing).ensure_events_stream().action == EnsureAction::unchanged);
  CHECK(Topology(orders).streams().size() == 1);

  // Both sides publish into the one stream.
  natspubsub_publish(raw, "acc", "orders", "order.created", "5a0c1f6e-1111-4c1e-9d1e-000000000001", {{"n", 1}});
  (void)Publisher(orders).publish("order.created", {{"n", 2}});
  CHECK(raw.stream_messages("acc-events-stream") == 2);
}

TEST_CASE("a C++ consumer first, then NatsPubsub's publishing app: its events reach the consumer") {
  // NatsPubsub never adds subjects to a stream it finds: the C++ consumer of its topics does.
  testing::NatsServer server;
  testing::RawNats raw(server.url());
  Connection billing(mixed_config(server.url(), "billing"));
  std::atomic<int> received{0};
  Consumer consumer(billing);
  consumer.subscribe_subject("acc.orders.order.created", [&](const Message&) { received++; }, {.concurrency = 1});
  consumer.start();
  const auto before = shape_of(raw, "acc-events-stream");
  CHECK(before.subjects == std::vector<std::string>{"acc.events.>", "acc.orders.>"});

  REQUIRE(natspubsub_setup(raw, "acc", "orders") == 0);
  natspubsub_publish(raw, "acc", "orders", "order.created", "5a0c1f6e-2222-4c1e-9d1e-000000000001", {{"n", 1}});
  CHECK(testing::eventually([&] { return received == 1; }, 10s));
  consumer.stop(5000ms);
  check_not_weakened(before, shape_of(raw, "acc-events-stream"));
}

TEST_CASE("NatsPubsub first, then C++: both succeed, the stream is not weakened") {
  testing::NatsServer server;
  testing::RawNats raw(server.url());
  REQUIRE(natspubsub_setup(raw, "acc", "orders") == 0);
  const auto made = shape_of(raw, "acc-events-stream");
  CHECK(made.storage == js_FileStorage);
  CHECK(made.max_age == kSevenDaysNs);
  CHECK(made.duplicates == 120000 * kNanosPerMilli);  // the server's default window

  // C++ orders (memory storage and no age limit in its own config): kept as NatsPubsub made it.
  Connection orders(mixed_config(server.url(), "orders"));
  auto r = Topology(orders).ensure_events_stream();
  CHECK(r.stream == "acc-events-stream");
  CHECK(r.action == EnsureAction::unchanged);
  CHECK_FALSE(r.not_applied.empty());
  check_not_weakened(made, shape_of(raw, "acc-events-stream"));

  // C++ billing: gets its subjects on NatsPubsub's stream.
  Connection billing(mixed_config(server.url(), "billing"));
  auto b = Topology(billing).ensure_events_stream();
  CHECK(b.action == EnsureAction::updated);
  const auto extended = shape_of(raw, "acc-events-stream");
  check_not_weakened(made, extended);
  CHECK(extended.subjects == std::vector<std::string>{"acc.events.>", "acc.orders.>", "acc.billing.>"});

  // NatsPubsub's setup runs again (a restart, another instance): still fine, nothing changes.
  CHECK(natspubsub_setup(raw, "acc", "orders") == 0);
  CHECK(natspubsub_setup(raw, "acc", "billing") == 0);
  const auto again = shape_of(raw, "acc-events-stream");
  check_not_weakened(extended, again);
  CHECK(again.subjects == extended.subjects);

  // The C++ consumer's DLQ stream beside it passes the overlap guard too.
  CHECK(Topology(billing).ensure_dlq_stream().action == EnsureAction::created);
  CHECK(Topology(billing).stream_for("acc.orders.order.created") == "acc-events-stream");
}

TEST_CASE("simultaneous first start: NatsPubsub and four C++ apps, every C++ start succeeds") {
  testing::NatsServer server;
  testing::RawNats raw(server.url());
  std::vector<std::unique_ptr<Connection>> apps;
  for (const char* app : {"billing", "shipping", "stock", "mail"})
    apps.push_back(std::make_unique<Connection>(mixed_config(server.url(), app)));
  std::atomic<int> ready{0}, failed{0};
  std::atomic<bool> go{false};
  {
    std::vector<std::jthread> starters;
    for (auto& app : apps) {
      starters.emplace_back([&, c = app.get()] {
        ready++;
        while (!go) std::this_thread::yield();
        try {
          auto r = Topology(*c).ensure_events_stream();
          if (r.stream != "acc-events-stream") failed++;
        } catch (const std::exception& e) {
          MESSAGE(e.what());
          failed++;
        }
      });
    }
    starters.emplace_back([&] {
      ready++;
      while (!go) std::this_thread::yield();
      (void)natspubsub_setup(raw, "acc", "orders");  // NatsPubsub's own result is its business
    });
    while (ready < 5) std::this_thread::yield();
    go = true;
  }
  CHECK(failed == 0);
  CHECK(Topology(*apps[0]).streams().size() == 1);
  // Concurrent stream updates can replace each other's subject lists (no compare-and-set on the
  // server); each app looks again after its update settles and adds its own back. Without that
  // look 6 runs of 6 lost a C++ app's subject here; with it 10 of 10 kept all four.
  const auto settled = shape_of(raw, "acc-events-stream").subjects;
  std::string subjects;
  for (const auto& s : settled) subjects += s + " ";
  MESSAGE("subjects after the simultaneous start: " << subjects);
  for (const char* s : {"acc.events.>", "acc.billing.>", "acc.shipping.>", "acc.stock.>", "acc.mail.>"})
    CHECK_MESSAGE(std::count(settled.begin(), settled.end(), std::string(s)) == 1, s);
  CHECK(shape_of(raw, "acc-events-stream").retention == js_LimitsPolicy);
}

TEST_CASE("a NatsPubsub durable found with other settings is adopted, not changed") {
  testing::NatsServer server;
  testing::RawNats raw(server.url());
  REQUIRE(natspubsub_setup(raw, "acc", "orders") == 0);
  natspubsub_durable_setup(raw, "acc-events-stream", "billing", "acc.orders.order.created");
  const auto before = consumer_shape(raw, "acc-events-stream", "billing_acc_orders_order_created");

  auto config = mixed_config(server.url(), "billing");
  Connection billing(config);
  Topology t(billing);
  auto spec = Topology::consumer_spec(config, "acc.orders.order.created");
  CHECK(spec.durable == "billing_acc_orders_order_created");
  auto r = t.ensure_consumer(spec);
  CHECK(r.action == EnsureAction::adopted);
  CHECK(r.stream == "acc-events-stream");
  CHECK(r.changes.empty());
  CHECK_FALSE(r.not_applied.empty());
  CHECK(r.max_deliver == 5);
  CHECK(r.ack_wait == 30000ms);
  CHECK(r.max_ack_pending == 10);

  const auto after = consumer_shape(raw, "acc-events-stream", "billing_acc_orders_order_created");
  CHECK(after.filter == before.filter);
  CHECK(after.max_deliver == 5);
  CHECK(after.ack_wait == before.ack_wait);
  CHECK(after.max_ack_pending == before.max_ack_pending);
  CHECK(after.ack_policy == before.ack_policy);
  CHECK(after.deliver_policy == before.deliver_policy);

  // A durable of that name on other messages cannot be shared: a clear error, nothing changed.
  auto wrong = spec;
  wrong.filter_subject = "acc.orders.order.cancelled";
  CHECK_THROWS_AS((void)t.ensure_consumer(wrong), TopologyError);

  // Standard mode keeps updating its own durables as before.
  auto standard = config;
  standard.topology = TopologyMode::standard;
  auto own = Topology::consumer_spec(standard, "acc.orders.order.created");
  own.stream = "acc-events-stream";
  CHECK(t.ensure_consumer(own).action == EnsureAction::created);
  own.max_deliver = 9;
  CHECK(t.ensure_consumer(own).action == EnsureAction::updated);
}

TEST_CASE("a NatsPubsub-shaped consumer and a C++ Consumer share one durable: 2,000 events, each once") {
  constexpr int kEvents = 2000;
  const std::string subject = "acc.orders.order.created";
  const std::string durable = "billing_acc_orders_order_created";
  testing::NatsServer server;
  testing::RawNats raw(server.url());
  REQUIRE(natspubsub_setup(raw, "acc", "orders") == 0);
  natspubsub_durable_setup(raw, "acc-events-stream", "billing", subject);

  std::mutex mutex;
  std::map<std::string, int> processed;  // event id -> handler runs, both sides together
  std::atomic<int> by_js{0}, by_cpp{0};
  auto record = [&](const std::string& event_id) {
    std::lock_guard lock(mutex);
    return ++processed[event_id];
  };
  auto total = [&] {
    std::lock_guard lock(mutex);
    return processed.size();
  };

  // C++ billing joins in the natspubsub mode: the same durable, adopted.
  auto config = mixed_config(server.url(), "billing");
  Connection billing(config);
  CHECK(Topology(billing).ensure_events_stream().action == EnsureAction::updated);
  Consumer consumer(billing);
  consumer.subscribe_subject(subject, [&](const Message& m) {
    record(m.envelope.event_id);
    by_cpp++;
    std::this_thread::sleep_for(200us);
  }, {.concurrency = 4});
  consumer.start();
  CHECK(consumer.stats(durable).durable == durable);
  const auto shared = consumer_shape(raw, "acc-events-stream", durable);  // still NatsPubsub's settings
  CHECK(shared.max_deliver == 5);
  CHECK(shared.max_ack_pending == 10);
  CHECK(shared.ack_wait == 30000 * kNanosPerMilli);

  // NatsPubsub's instance: a pull subscription bound to the durable, one plain ack per message.
  testing::RawNats js_side(server.url());  // its own connection, as a separate process would have
  std::jthread js_instance([&](std::stop_token st) {
    natsSubscription* sub = nullptr;
    jsSubOptions so;
    jsSubOptions_Init(&so);
    so.Stream = "acc-events-stream";
    so.Consumer = durable.c_str();
    jsErrCode jerr = static_cast<jsErrCode>(0);
    if (js_PullSubscribe(&sub, js_side.js(), subject.c_str(), durable.c_str(), nullptr, &so, &jerr) != NATS_OK) return;
    while (!st.stop_requested()) {
      natsMsgList list{};
      natsStatus s = natsSubscription_Fetch(&list, sub, 10, 200, &jerr);
      if (s != NATS_OK) continue;  // timeout: nothing pending now
      for (int i = 0; i < list.Count; ++i) {
        natsMsg* msg = list.Msgs[i];
        auto body = nlohmann::json::parse(std::string(natsMsg_GetData(msg), natsMsg_GetDataLength(msg)), nullptr,
                                          false);
        if (body.is_object() && body.contains("event_id")) {
          record(body["event_id"].get<std::string>());
          by_js++;
        }
        natsMsg_Ack(msg, nullptr);
        std::this_thread::sleep_for(200us);
      }
      natsMsgList_Destroy(&list);
    }
    natsSubscription_Unsubscribe(sub);
    natsSubscription_Destroy(sub);
  });

  // NatsPubsub's orders app publishes half, the C++ side (same envelope and subject) the other half.
  Connection orders(mixed_config(server.url(), "orders"));
  Publisher publisher(orders);
  for (int i = 0; i < kEvents; ++i) {
    if (i % 2 == 0) {
      char id[37];
      std::snprintf(id, sizeof id, "7d3f0000-0000-4000-8000-%012d", i);
      natspubsub_publish(raw, "acc", "orders", "order.created", id, {{"n", i}});
    } else {
      (void)publisher.publish("order.created", {{"n", i}});
    }
  }

  REQUIRE(testing::eventually([&] { return total() == static_cast<size_t>(kEvents); }, 60s));
  // Let anything that would be a second delivery show up before counting.
  std::this_thread::sleep_for(500ms);
  js_instance.request_stop();
  js_instance.join();
  consumer.stop(5000ms);

  std::lock_guard lock(mutex);
  CHECK(processed.size() == static_cast<size_t>(kEvents));
  int twice = 0;
  for (const auto& [id, runs] : processed) twice += runs > 1 ? 1 : 0;
  CHECK(twice == 0);
  CHECK(by_js + by_cpp == kEvents);
  CHECK(by_js > 0);
  CHECK(by_cpp > 0);
  MESSAGE("NatsPubsub-shaped instance: " << by_js.load() << ", C++ Consumer: " << by_cpp.load());
  CHECK(raw.stream_messages("acc-events-stream") == static_cast<uint64_t>(kEvents));
}

TEST_CASE("NatsPubsub's trace_id header is accepted and carried on") {
  testing::NatsServer server;
  testing::RawNats raw(server.url());
  REQUIRE(natspubsub_setup(raw, "acc", "orders") == 0);
  auto config = mixed_config(server.url(), "billing");
  Connection billing(config);
  (void)Topology(billing).ensure_events_stream();

  std::mutex mutex;
  std::map<std::string, TraceContext> traces;  // by event id
  Publisher follow_up(billing);
  Consumer consumer(billing);
  consumer.use(middleware::trace_context());
  consumer.subscribe_subject("acc.orders.order.created", [&](const Message& m) {
    auto t = current_trace();
    {
      std::lock_guard lock(mutex);
      traces[m.envelope.event_id] = t.value_or(TraceContext{});
    }
    (void)follow_up.publish("payment.completed", {{"for", m.envelope.event_id}});
  }, {.concurrency = 1});
  consumer.start();

  const std::string e_free = "9b2e0000-0000-4000-8000-000000000001";
  const std::string e_uuid = "9b2e0000-0000-4000-8000-000000000002";
  const std::string e_header = "9b2e0000-0000-4000-8000-000000000003";
  const std::string free_text = "req-42";
  const std::string uuid = "4BF92F35-77B3-4DA6-A3CE-929D0E0E4736";
  natspubsub_publish(raw, "acc", "orders", "order.created", e_free, {{"n", 1}}, free_text);
  natspubsub_publish(raw, "acc", "orders", "order.created", e_uuid, {{"n", 2}}, uuid);
  // The header alone, as a NatsPubsub middleware may set it without touching the envelope.
  {
    const std::string body = nlohmann::json{{"event_id", e_header},
                                            {"schema_version", 1},
                                            {"topic", "order.created"},
                                            {"producer", "orders"},
                                            {"occurred_at", "2026-12-01T10:00:00.000Z"},
                                            {"message", {{"n", 3}}}}
                                 .dump();
    natsMsg* msg = nullptr;
    REQUIRE(natsMsg_Create(&msg, "acc.orders.order.created", nullptr, body.data(), static_cast<int>(body.size())) ==
            NATS_OK);
    natsMsgHeader_Set(msg, "Nats-Msg-Id", e_header.c_str());
    natsMsgHeader_Set(msg, "topic", "order.created");
    natsMsgHeader_Set(msg, "trace_id", "0af7651916cd43dd8448eb211c80319c");
    jsPubAck* ack = nullptr;
    REQUIRE(js_PublishMsg(&ack, raw.js(), msg, nullptr, nullptr) == NATS_OK);
    jsPubAck_Destroy(ack);
    natsMsg_Destroy(msg);
  }
  REQUIRE(testing::eventually([&] {
    std::lock_guard lock(mutex);
    return traces.size() == 3;
  }, 10s));
  consumer.stop(5000ms);

  std::lock_guard lock(mutex);
  CHECK(traces[e_free].origin_trace_id == free_text);
  CHECK(traces[e_free].trace_id.size() == 32);  // a W3C trace of its own for traceparent
  CHECK(traces[e_uuid].trace_id == "4bf92f3577b34da6a3ce929d0e0e4736");
  CHECK(traces[e_uuid].origin_trace_id == uuid);
  CHECK(traces[e_header].trace_id == "0af7651916cd43dd8448eb211c80319c");
  CHECK(traces[e_header].origin_trace_id.empty());

  // Follow-up events carry the trace id as NatsPubsub wrote it.
  std::map<std::string, nlohmann::json> follow;
  for (const auto& m : raw.read_stream("acc-events-stream")) {
    auto body = nlohmann::json::parse(m.data);
    if (body["topic"] == "payment.completed") follow[body["message"]["for"].get<std::string>()] = body;
  }
  REQUIRE(follow.size() == 3);
  CHECK(follow[e_free]["trace_id"] == free_text);
  CHECK(follow[e_uuid]["trace_id"] == uuid);
  CHECK(follow[e_header]["trace_id"] == "0af7651916cd43dd8448eb211c80319c");
}
