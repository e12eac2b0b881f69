// ctest-labels: integration
#include <atomic>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include <doctest/doctest.h>
#include <nats/nats.h>

#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/middleware.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/request.hpp>
#include <natspubsub/topology.hpp>

#include "support/nats_helpers.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;

namespace {

std::string header_of(natsMsg* msg, const char* key) {
  const char* v = nullptr;
  return natsMsgHeader_Get(msg, key, &v) == NATS_OK && v != nullptr ? std::string(v) : std::string();
}

std::string body_of(natsMsg* msg) {
  return std::string(natsMsg_GetData(msg), static_cast<size_t>(natsMsg_GetDataLength(msg)));
}

// A raw request with plain cnats, as a client in another language would send it.
struct RawReply {
  std::string body;
  std::string error;
  std::string code;
  std::string correlation;
};

RawReply raw_request(natsConnection* nc, const std::string& subject, const std::string& body,
                     const std::string& correlation = "") {
  natsMsg* req = nullptr;
  REQUIRE(natsMsg_Create(&req, subject.c_str(), nullptr, body.data(), static_cast<int>(body.size())) == NATS_OK);
  if (!correlation.empty()) natsMsgHeader_Set(req, "correlation-id", correlation.c_str());
  natsMsg* reply = nullptr;
  REQUIRE(natsConnection_RequestMsg(&reply, nc, req, 2000) == NATS_OK);
  RawReply r{body_of(reply), header_of(reply, "Nats-Service-Error"), header_of(reply, "Nats-Service-Error-Code"),
             header_of(reply, "correlation-id")};
  natsMsg_Destroy(reply);
  natsMsg_Destroy(req);
  return r;
}

}  // namespace

TEST_CASE("request/reply round trip: envelope, message id, correlation id propagated through a nested request") {
  testing::NatsServer server;
  Connection inventory(testing::test_config(server.url(), "inventory"));
  Connection pricing_conn(testing::test_config(server.url(), "pricing"));
  Connection orders(testing::test_config(server.url(), "orders"));

  std::mutex m;
  std::vector<Request> seen_by_pricing;
  Responder pricing(pricing_conn, "price.get", [&](const Request& r) -> nlohmann::json {
    std::lock_guard lock(m);
    seen_by_pricing.push_back(r);
    return {{"cents", 2599}};
  });

  std::vector<Request> seen_by_stock;
  Responder stock(inventory, "stock.check", [&](const Request& r) -> nlohmann::json {
    {
      std::lock_guard lock(m);
      seen_by_stock.push_back(r);
    }
    // Answering one request by asking another service: the correlation id travels on.
    auto price = request(inventory, "price.get", {{"sku", r.data().at("sku")}},
                         {.timeout = Millis{2000}, .app = "pricing"});
    return {{"sku", r.data().at("sku")}, {"available", 7}, {"price", price.data}};
  });
  CHECK(stock.subject() == "test.inventory.stock.check");
  CHECK(stock.queue_group() == "test-inventory");

  Reply reply;
  {
    CorrelationScope scope("order-1001-checkout");
    reply = request(orders, "stock.check", {{"sku", "A-1"}},
                    {.timeout = Millis{2000}, .app = "inventory", .message_type = "StockCheck"});
  }
  CHECK_FALSE(current_correlation_id().has_value());  // the scope restored "none"
  CHECK(reply.data["sku"] == "A-1");
  CHECK(reply.data["available"] == 7);
  CHECK(reply.data["price"]["cents"] == 2599);
  CHECK(reply.correlation_id == "order-1001-checkout");
  CHECK(reply.subject == "test.inventory.stock.check");
  CHECK(reply.attempts == 1);
  CHECK(is_uuid(reply.message_id));
  CHECK(now_ms() - reply.timestamp < std::chrono::seconds(5));
  CHECK(reply.headers.at("correlation-id") == "order-1001-checkout");

  std::lock_guard lock(m);
  REQUIRE(seen_by_stock.size() == 1);
  const auto& got = seen_by_stock[0];
  CHECK(got.message_id() == reply.message_id);  // the reply names the request it answers
  CHECK(got.correlation_id == "order-1001-checkout");
  CHECK(got.envelope.producer == "orders");
  CHECK(got.envelope.topic == "stock.check");
  CHECK(got.envelope.message_type == "StockCheck");
  CHECK(got.subject == "test.inventory.stock.check");
  CHECK(got.header("topic") == "stock.check");
  CHECK(now_ms() - got.envelope.occurred_at < std::chrono::seconds(5));
  REQUIRE(seen_by_pricing.size() == 1);
  CHECK(seen_by_pricing[0].correlation_id == "order-1001-checkout");
  CHECK(seen_by_pricing[0].envelope.producer == "inventory");
  CHECK(seen_by_pricing[0].message_id() != got.message_id());  // a new message, the same conversation
}

TEST_CASE("without a current correlation id the message id is the correlation id; explicit options win") {
  testing::NatsServer server;
  Connection c(testing::test_config(server.url(), "inventory"));
  Responder echo(c, "echo", [](const Request& r) -> nlohmann::json { return {{"correlation", r.correlation_id}}; });
  auto a = request(c, "echo", {{"x", 1}});  // own app by default
  CHECK(a.data["correlation"] == a.message_id);
  CHECK(a.correlation_id == a.message_id);

  const auto id = new_uuid();
  auto b = request(c, "echo", {{"x", 1}}, {.message_id = id, .correlation_id = "explicit"});
  CHECK(b.message_id == id);
  CHECK(b.data["correlation"] == "explicit");

  auto d = request(c, "ignored.topic", {{"x", 1}}, {.subject = "test.inventory.echo"});
  CHECK(d.subject == "test.inventory.echo");
}

TEST_CASE("correlation id propagated from the consumer message being handled, and from the current trace") {
  testing::NatsServer server;
  Connection inventory(testing::test_config(server.url(), "inventory"));
  Connection orders(testing::test_config(server.url(), "orders"));
  std::mutex m;
  std::vector<Request> seen;
  Responder stock(inventory, "stock.reserve", [&](const Request& r) -> nlohmann::json {
    std::lock_guard lock(m);
    seen.push_back(r);
    return {{"reserved", true}, {"trace", current_trace() ? current_trace()->trace_id : ""}};
  });

  // An order event handled by the consumer asks inventory: the request carries the event's
  // correlation-id header, or the event id when it has none.
  Topology(orders).ensure_events_stream();
  Publisher publisher(orders);
  PublishOptions with_header;
  with_header.headers["correlation-id"] = "checkout-77";
  const auto tagged = publisher.publish("order.created", {{"n", 1}}, with_header);
  const auto plain = publisher.publish("order.created", {{"n", 2}});
  std::atomic<int> replies{0};
  Consumer consumer(orders);
  consumer.subscribe("order.created", [&](const Message&) {
    auto reply = request(orders, "stock.reserve", {{"sku", "A"}}, {.timeout = Millis{2000}, .app = "inventory"});
    if (reply.data["reserved"] == true) replies++;
  });
  consumer.start();
  for (int i = 0; i < 400 && replies < 2; ++i) std::this_thread::sleep_for(10ms);
  consumer.stop(Millis{5000});
  REQUIRE(replies == 2);
  {
    std::lock_guard lock(m);
    std::set<std::string> correlations;
    for (const auto& r : seen) correlations.insert(r.correlation_id);
    CHECK(correlations == std::set<std::string>{"checkout-77", plain.event_id});
    CHECK(tagged.event_id != "checkout-77");
    seen.clear();
  }

  // Outside any handler, the current trace (middleware::trace_context, or a TraceScope) gives the
  // correlation id, and the responder continues the same trace.
  const auto trace = TraceContext::new_root();
  Reply reply;
  {
    TraceScope scope(trace);
    reply = request(orders, "stock.reserve", {{"sku", "B"}}, {.app = "inventory"});
  }
  CHECK(reply.correlation_id == trace.trace_id);
  CHECK(reply.data["trace"] == trace.trace_id);
  std::lock_guard lock(m);
  REQUIRE(seen.size() == 1);
  auto parent = TraceContext::parse(seen[0].header("traceparent"));
  REQUIRE(parent.has_value());
  CHECK(parent->trace_id == trace.trace_id);
  CHECK(parent->span_id == trace.span_id);
}

TEST_CASE("a throwing handler: the caller gets RemoteError with the remote message; the wire shows the standard error reply") {
  testing::NatsServer server;
  Connection inventory(testing::test_config(server.url(), "inventory"));
  Connection orders(testing::test_config(server.url(), "orders"));
  Responder broken(inventory, "stock.reserve", [](const Request&) -> nlohmann::json {
    throw std::runtime_error("warehouse 7 is offline");
  });
  Responder weird(inventory, "stock.weird", [](const Request&) -> nlohmann::json { throw 42; });
  Responder not_found(inventory, "stock.find", [](const Request& r) -> nlohmann::json {
    throw RemoteError(404, "unknown sku " + r.data().at("sku").get<std::string>());
  });

  std::string sent_id;
  try {
    (void)request(orders, "stock.reserve", {{"sku", "A-1"}}, {.app = "inventory"});
    FAIL("a throwing handler produced a success");
  } catch (const RemoteError& e) {
    CHECK(e.code() == 500);
    CHECK(e.remote_message() == "warehouse 7 is offline");
    CHECK(e.subject() == "test.inventory.stock.reserve");
    CHECK(is_uuid(e.message_id()));
    CHECK_FALSE(e.unavailable());
    CHECK(std::string(e.what()).find("warehouse 7 is offline") != std::string::npos);
  }
  try {
    (void)request(orders, "stock.weird", {{"sku", "A-1"}}, {.app = "inventory"});
    FAIL("a handler throwing a non-exception produced a success");
  } catch (const RemoteError& e) {
    CHECK(e.code() == 500);
    CHECK(e.remote_message() == "non-standard exception");
  }
  try {
    (void)request(orders, "stock.find", {{"sku", "Z-9"}}, {.app = "inventory"});
    FAIL("RemoteError from a handler produced a success");
  } catch (const RemoteError& e) {
    CHECK(e.code() == 404);
    CHECK(e.remote_message() == "unknown sku Z-9");
  }

  // On the wire, as any NATS client sees it.
  testing::RawNats raw(server.url());
  auto envelope = Envelope::make("stock.reserve", "orders", {{"sku", "A-1"}});
  auto r = raw_request(raw.nc(), "test.inventory.stock.reserve", envelope.encode(), "corr-7");
  auto j = nlohmann::json::parse(r.body);
  CHECK(j.size() == 4);
  CHECK(j["success"] == false);
  CHECK(j["error"] == "warehouse 7 is offline");
  CHECK(j["messageId"] == envelope.event_id);
  CHECK_NOTHROW((void)parse_timestamp(j["timestamp"].get<std::string>()));
  CHECK(r.error == "warehouse 7 is offline");
  CHECK(r.code == "500");
  CHECK(r.correlation == "corr-7");

  // A request that is no envelope is still answered: 400, never silence.
  auto bad = raw_request(raw.nc(), "test.inventory.stock.reserve", "not json at all");
  CHECK(bad.code == "400");
  CHECK(nlohmann::json::parse(bad.body)["success"] == false);
  CHECK(broken.stats().malformed == 1);
  CHECK(broken.stats().errors == 3);
  CHECK(broken.stats().requests == 3);
  CHECK(broken.stats().last_error.find("envelope") != std::string::npos);

  // A success on the wire.
  Responder ok(inventory, "stock.ok", [](const Request&) -> nlohmann::json { return {{"fine", true}}; });
  auto good = raw_request(raw.nc(), "test.inventory.stock.ok", envelope.encode());
  auto gj = nlohmann::json::parse(good.body);
  CHECK(gj["success"] == true);
  CHECK(gj["data"]["fine"] == true);
  CHECK(gj["messageId"] == envelope.event_id);
  CHECK(good.code.empty());
}

TEST_CASE("timeout, no responders and remote error are three distinct types") {
  testing::NatsServer server;
  Connection c(testing::test_config(server.url(), "orders"));
  testing::RawNats raw(server.url());
  // Listens but never answers.
  natsSubscription* silent = nullptr;
  REQUIRE(natsConnection_SubscribeSync(&silent, raw.nc(), "test.inventory.stock.slow") == NATS_OK);
  REQUIRE(natsConnection_Flush(raw.nc()) == NATS_OK);

  const auto t0 = std::chrono::steady_clock::now();
  bool timed_out = false;
  try {
    (void)request(c, "stock.slow", {{"sku", "A"}}, {.timeout = Millis{300}, .app = "inventory"});
  } catch (const NoRespondersError&) {
    FAIL("timeout reported as no responders");
  } catch (const TimeoutError& e) {
    timed_out = true;
    CHECK(std::string(e.what()).find("300 ms") != std::string::npos);
  }
  CHECK(timed_out);
  const auto took = std::chrono::steady_clock::now() - t0;
  CHECK(took >= 290ms);
  CHECK(took < 1500ms);

  bool no_responders = false;
  try {
    (void)request(c, "stock.nobody", {{"sku", "A"}}, {.timeout = Millis{2000}, .app = "inventory"});
  } catch (const TimeoutError&) {
    FAIL("no responders reported as a timeout");
  } catch (const NoRespondersError& e) {
    no_responders = true;
    CHECK(std::string(e.what()).find("test.inventory.stock.nobody") != std::string::npos);
  }
  CHECK(no_responders);
  CHECK(std::chrono::steady_clock::now() - t0 < 2500ms);  // answered by the server at once, not after 2 s

  // An answer that is not a reply of ours is a decode error, not a success.
  natsSubscription* plain = nullptr;
  REQUIRE(natsConnection_Subscribe(&plain, raw.nc(), "test.inventory.stock.plain",
                                   [](natsConnection* nc, natsSubscription*, natsMsg* msg, void*) {
                                     natsConnection_PublishString(nc, natsMsg_GetReply(msg), "hello");
                                     natsMsg_Destroy(msg);
                                   },
                                   nullptr) == NATS_OK);
  REQUIRE(natsConnection_Flush(raw.nc()) == NATS_OK);
  CHECK_THROWS_AS((void)request(c, "stock.plain", {}, {.app = "inventory"}), EnvelopeError);

  // RemoteError, TimeoutError and NoRespondersError share no branch below Error.
  static_assert(!std::is_base_of_v<NatsError, RemoteError>);
  static_assert(!std::is_base_of_v<TimeoutError, NoRespondersError>);
  static_assert(!std::is_base_of_v<NoRespondersError, TimeoutError>);

  CHECK_THROWS_AS((void)request(c, "bad topic", {}), SubjectError);
  CHECK_THROWS_AS((void)request(c, "x", {}, {.timeout = Millis{0}}), ConfigError);
  natsSubscription_Unsubscribe(plain);
  natsSubscription_Destroy(plain);
  natsSubscription_Destroy(silent);
}

TEST_CASE("retries only for idempotent requests, with the same message id") {
  testing::NatsServer server;
  Connection c(testing::test_config(server.url(), "inventory"));
  try {
    (void)request(c, "stock.check", {}, {.retries = 2});
    FAIL("retries accepted for a request not marked idempotent");
  } catch (const ConfigError& e) {
    CHECK(e.field() == "request.retries");
  }

  std::mutex m;
  std::vector<std::string> ids;
  Responder flaky(c, "stock.flaky", [&](const Request& r) -> nlohmann::json {
    std::lock_guard lock(m);
    ids.push_back(r.message_id());
    if (ids.size() < 3) throw RemoteError(RemoteError::kUnavailable, "warming up");
    return {{"ok", true}};
  });
  auto reply = request(c, "stock.flaky", {}, {.idempotent = true, .retries = 3, .retry_delay = Millis{10}});
  CHECK(reply.attempts == 3);
  std::lock_guard lock(m);
  REQUIRE(ids.size() == 3);
  CHECK(ids[0] == ids[1]);
  CHECK(ids[1] == ids[2]);
  CHECK(reply.message_id == ids[0]);

  // A 500 is not retried: the handler failed, doing it again is the caller's call.
  Responder failing(c, "stock.fail", [&](const Request&) -> nlohmann::json { throw std::runtime_error("no"); });
  CHECK_THROWS_AS((void)request(c, "stock.fail", {}, {.idempotent = true, .retries = 3, .retry_delay = Millis{10}}),
                  RemoteError);
  CHECK(failing.stats().requests == 1);

  // Nobody listening at all: every attempt fails the same way, then the typed error.
  const auto t0 = std::chrono::steady_clock::now();
  CHECK_THROWS_AS((void)request(c, "stock.gone", {}, {.idempotent = true, .retries = 2, .retry_delay = Millis{50}}),
                  NoRespondersError);
  CHECK(std::chrono::steady_clock::now() - t0 >= 100ms);  // two waits between three attempts
}

TEST_CASE("3 responders in one queue group answer 3,000 requests: none twice, all three serving") {
  testing::NatsServer server;
  auto config = testing::test_config(server.url(), "inventory");
  std::vector<std::unique_ptr<Connection>> replicas;
  std::mutex m;
  std::vector<std::set<std::string>> served(3);
  std::atomic<int> duplicates{0};
  std::vector<std::unique_ptr<Responder>> responders;
  for (int i = 0; i < 3; ++i) {
    replicas.push_back(std::make_unique<Connection>(config));  // one process each, as in production
    responders.push_back(std::make_unique<Responder>(*replicas.back(), "stock.check", [&, i](const Request& r) -> nlohmann::json {
      std::lock_guard lock(m);
      for (int k = 0; k < 3; ++k)
        if (served[k].count(r.message_id()) > 0) duplicates++;
      served[i].insert(r.message_id());
      return {{"replica", i}};
    }));
  }
  Connection orders(testing::test_config(server.url(), "orders"));
  constexpr int kThreads = 4;
  constexpr int kPerThread = 750;
  std::atomic<int> answered{0};
  std::vector<int> by_reply(3, 0);
  {
    std::vector<std::jthread> clients;
    for (int t = 0; t < kThreads; ++t)
      clients.emplace_back([&] {
        std::vector<int> mine(3, 0);
        for (int i = 0; i < kPerThread; ++i) {
          auto reply = request(orders, "stock.check", {{"n", i}}, {.timeout = Millis{5000}, .app = "inventory"});
          mine[reply.data["replica"].get<int>()]++;
          answered++;
        }
        std::lock_guard lock(m);
        for (int k = 0; k < 3; ++k) by_reply[k] += mine[k];
      });
  }
  CHECK(answered == kThreads * kPerThread);
  std::lock_guard lock(m);
  CHECK(duplicates == 0);
  std::set<std::string> all;
  size_t total = 0;
  for (int k = 0; k < 3; ++k) {
    MESSAGE("replica " << k << " served " << served[k].size());
    CHECK(served[k].size() > 300);  // every replica takes a real share, not a token one
    CHECK(static_cast<int>(served[k].size()) == by_reply[k]);
    total += served[k].size();
    all.insert(served[k].begin(), served[k].end());
  }
  CHECK(total == 3000);
  CHECK(all.size() == 3000);
  for (int k = 0; k < 3; ++k) CHECK(responders[k]->stats().requests == served[k].size());
}

TEST_CASE("graceful stop drains: requests already received are answered, then nobody listens") {
  testing::NatsServer server;
  Connection inventory(testing::test_config(server.url(), "inventory"));
  std::atomic<int> started{0};
  auto stock = std::make_unique<Responder>(inventory, "stock.slow", [&](const Request& r) -> nlohmann::json {
    started++;
    std::this_thread::sleep_for(100ms);
    return {{"n", r.data().at("n")}};
  });

  // Five requests at once from a raw client; the responder handles one at a time.
  testing::RawNats raw(server.url());
  natsSubscription* inbox_sub = nullptr;
  REQUIRE(natsConnection_SubscribeSync(&inbox_sub, raw.nc(), "_INBOX.drain-test") == NATS_OK);
  for (int i = 0; i < 5; ++i) {
    auto body = Envelope::make("stock.slow", "orders", {{"n", i}}).encode();
    REQUIRE(natsConnection_PublishRequest(raw.nc(), "test.inventory.stock.slow", "_INBOX.drain-test", body.data(),
                                          static_cast<int>(body.size())) == NATS_OK);
  }
  REQUIRE(natsConnection_Flush(raw.nc()) == NATS_OK);
  for (int i = 0; i < 50 && started == 0; ++i) std::this_thread::sleep_for(10ms);
  REQUIRE(started > 0);
  stock->stop(Millis{5000});  // returns once all five are answered
  CHECK(started == 5);

  std::set<int> answered;
  for (int i = 0; i < 5; ++i) {
    natsMsg* msg = nullptr;
    if (natsSubscription_NextMsg(&msg, inbox_sub, 1000) != NATS_OK) break;
    auto j = nlohmann::json::parse(body_of(msg));
    CHECK(j["success"] == true);
    answered.insert(j["data"]["n"].get<int>());
    natsMsg_Destroy(msg);
  }
  CHECK(answered == std::set<int>{0, 1, 2, 3, 4});
  natsSubscription_Destroy(inbox_sub);

  stock->stop();  // twice is fine
  CHECK_THROWS_AS((void)request(inventory, "stock.slow", {{"n", 9}}, {.timeout = Millis{1000}}), NoRespondersError);
  stock.reset();
}
