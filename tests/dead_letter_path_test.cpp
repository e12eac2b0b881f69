// ctest-labels: integration
// The dead-letter path (src/dead_letter_path.hpp) alone against a real nats-server: a letter the
// DLQ takes TERMs its message; a letter the DLQ refuses NAKs it with the backoff delay and keeps
// the decision until the DLQ takes it; a MAX_DELIVERIES advisory becomes a letter.
#include <chrono>
#include <map>
#include <stop_token>
#include <string>

#include <doctest/doctest.h>
#include <nats/nats.h>

#include <natspubsub/connection.hpp>
#include <natspubsub/dlq.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/topology.hpp>

#include "dead_letter_path.hpp"
#include "support/eventually.hpp"
#include "support/nats_helpers.hpp"
#include "support/pull_consumer.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;
using detail::DeadLetterPath;
using detail::Delivery;
using detail::DeliveryState;
using Clock = std::chrono::steady_clock;

namespace {

constexpr const char* kEvents = "test-orders-events";
constexpr const char* kDlq = "test-orders-dlq";
constexpr const char* kDurable = "letters";

struct Fixture {
  testing::NatsServer server;
  testing::RawNats raw{server.url()};
  Connection connection{testing::test_config(server.url(), "orders")};
  DlqPublisher dlq{connection};
  std::unique_ptr<testing::PullConsumer> pull;

  Fixture() {
    raw.add_stream(kEvents, {"test.orders.>"});
    pull = std::make_unique<testing::PullConsumer>(raw, kEvents, kDurable, "test.orders.>");
  }

  void create_dlq() { Topology(connection).ensure_dlq_stream(); }

  std::unique_ptr<Delivery> fetch(std::chrono::milliseconds timeout = 5s) {
    natsMsg* msg = pull->fetch_one(timeout);
    if (msg == nullptr) return nullptr;
    return std::make_unique<Delivery>(detail::MsgPtr(msg), Clock::now());
  }

  std::vector<DeadLetter> letters() {
    std::vector<DeadLetter> out;
    for (const auto& m : raw.read_stream(kDlq))
      out.push_back(parse_dead_letter(m.subject, m.data, Headers(m.headers.begin(), m.headers.end())));
    return out;
  }
};

// What the consumer runtime reads from a delivery before its handler runs.
Message message_of(Delivery& d) {
  Message m;
  REQUIRE(d.begin([&](natsMsg* msg) {
    m.subject = natsMsg_GetSubject(msg);
    m.body = detail::body_of(msg);
    m.headers = detail::read_headers(msg);
    jsMsgMetaData* meta = nullptr;
    REQUIRE(natsMsg_GetMetaData(&meta, msg) == NATS_OK);
    m.metadata.stream = meta->Stream;
    m.metadata.stream_sequence = meta->Sequence.Stream;
    m.metadata.deliveries = meta->NumDelivered;
    jsMsgMetaData_Destroy(meta);
  }));
  try {
    m.envelope = Envelope::decode(m.body);
  } catch (const std::exception&) {
  }
  return m;
}

std::string envelope_body(const std::string& topic) {
  return Envelope::make(topic, "orders", {{"order_id", 7}}).encode();
}

uint64_t publish_with_headers(testing::RawNats& raw, const std::string& subject, const std::string& body,
                              const std::map<std::string, std::string>& headers) {
  natsMsg* msg = nullptr;
  REQUIRE(natsMsg_Create(&msg, subject.c_str(), nullptr, body.data(), static_cast<int>(body.size())) == NATS_OK);
  for (const auto& [k, v] : headers) REQUIRE(natsMsgHeader_Set(msg, k.c_str(), v.c_str()) == NATS_OK);
  jsPubAck* ack = nullptr;
  REQUIRE(js_PublishMsg(&ack, raw.js(), msg, nullptr, nullptr) == NATS_OK);
  const uint64_t seq = ack->Sequence;
  jsPubAck_Destroy(ack);
  natsMsg_Destroy(msg);
  return seq;
}

}  // namespace

TEST_CASE("a letter the DLQ takes is stored with its context, and its message is TERMed") {
  Fixture f;
  f.create_dlq();
  const std::string body = envelope_body("order.created");
  const uint64_t seq = f.pull->publish("test.orders.order.created", body);
  DeadLetterPath path(f.connection, f.dlq, kDurable, kEvents, "", Backoff::list({Millis{100}}));
  auto d = f.fetch();
  REQUIRE(d);
  const Message m = message_of(*d);
  CHECK(path.dead_letter(*d, m, DlqReason::permanent_error, "natspubsub::PermanentError", "no such order"));
  CHECK(d->state() == DeliveryState::dead_lettered);
  CHECK(path.dead_lettered() == 1);
  CHECK(path.failures() == 0);
  CHECK_FALSE(path.pending_letter(seq));

  const auto letters = f.letters();
  REQUIRE(letters.size() == 1);
  const auto& c = letters[0].context;
  CHECK(letters[0].body == body);
  CHECK(letters[0].original_subject == "test.orders.order.created");
  CHECK(c.reason == DlqReason::permanent_error);
  CHECK(c.error_class == "natspubsub::PermanentError");
  CHECK(c.error_message == "no such order");
  CHECK(c.event_id == m.envelope.event_id);
  CHECK(c.stream == kEvents);
  CHECK(c.sequence == seq);
  CHECK(c.consumer == kDurable);
  CHECK(c.deliveries == 1);
  CHECK(c.replay_sequence == 0);
  // TERMed: not delivered again.
  CHECK(testing::eventually([&] { return f.raw.durable_state(kEvents, kDurable).ack_pending == 0; }));
  CHECK_FALSE(f.fetch(1s));
}

TEST_CASE("a letter the DLQ refuses: NAKed with the backoff delay, the decision kept until the DLQ takes it") {
  Fixture f;  // no DLQ stream yet
  const uint64_t seq = f.pull->publish("test.orders.order.created", envelope_body("order.created"));
  DeadLetterPath path(f.connection, f.dlq, kDurable, kEvents, "", Backoff::list({Millis{600}}));
  auto d = f.fetch();
  REQUIRE(d);
  const auto refused_at = Clock::now();
  CHECK_FALSE(path.dead_letter(*d, message_of(*d), DlqReason::attempts_exhausted, "std::runtime_error", "db down"));
  CHECK(d->state() == DeliveryState::naked);
  CHECK(path.failures() == 1);
  CHECK(path.dead_lettered() == 0);
  auto pending = path.pending_letter(seq);
  REQUIRE(pending);
  CHECK(pending->reason == DlqReason::attempts_exhausted);
  CHECK(pending->error_class == "std::runtime_error");
  CHECK(pending->error_message == "db down");

  // Redelivered after the backoff delay, not before.
  auto again = f.fetch();
  REQUIRE(again);
  CHECK(Clock::now() - refused_at >= 550ms);
  const Message m = message_of(*again);
  CHECK(m.metadata.deliveries == 2);

  f.create_dlq();
  CHECK(path.dead_letter(*again, m, pending->reason, pending->error_class, pending->error_message));
  CHECK(again->state() == DeliveryState::dead_lettered);
  CHECK_FALSE(path.pending_letter(seq));
  CHECK(path.dead_lettered() == 1);
  const auto letters = f.letters();
  REQUIRE(letters.size() == 1);
  CHECK(letters[0].context.reason == DlqReason::attempts_exhausted);
  CHECK(letters[0].context.deliveries == 2);
}

TEST_CASE("a replay route's letter names the failed durable and points at the original message") {
  Fixture f;
  f.create_dlq();
  const std::string body = envelope_body("order.created");
  const uint64_t replay_seq = publish_with_headers(f.raw, "test.orders.replayed", body,
                                                   {{kReplayOriginalSubjectHeader, "test.orders.order.created"},
                                                    {kReplayOriginalStreamHeader, "ORIGINAL"},
                                                    {kReplayOriginalSequenceHeader, "41"},
                                                    {kOriginalMsgIdHeader, "original-id"},
                                                    {"Nats-Msg-Id", "replay-id"}});
  DeadLetterPath path(f.connection, f.dlq, "worker-replay", kEvents, "worker", Backoff::list({Millis{100}}));
  CHECK(path.owner() == "worker");
  auto d = f.fetch();
  REQUIRE(d);
  CHECK(path.dead_letter(*d, message_of(*d), DlqReason::permanent_error, "E", "again"));
  const auto letters = f.letters();
  REQUIRE(letters.size() == 1);
  const auto& c = letters[0].context;
  CHECK(c.consumer == "worker");
  CHECK(c.stream == "ORIGINAL");
  CHECK(c.sequence == 41);
  CHECK(c.replay_sequence == replay_seq);
}

TEST_CASE("a MAX_DELIVERIES advisory: the message named is read from its stream and dead-lettered once") {
  Fixture f;
  f.create_dlq();
  const uint64_t seq = f.pull->publish("test.orders.order.created", envelope_body("order.created"));
  const uint64_t seq2 = f.pull->publish("test.orders.order.paid", envelope_body("order.paid"));
  DeadLetterPath path(f.connection, f.dlq, kDurable, kEvents, "", Backoff::list({Millis{100}}));
  std::stop_source never;
  const std::string advisory = R"({"stream":")" + std::string(kEvents) + R"(","stream_seq":)" + std::to_string(seq) +
                               R"(,"deliveries":7})";
  CHECK(path.dead_letter_from_advisory(advisory, never.get_token()));
  CHECK_FALSE(path.dead_letter_from_advisory(advisory, never.get_token()));  // already there
  // An advisory naming no stream means the subscription's.
  CHECK(path.dead_letter_from_advisory(R"({"stream_seq":)" + std::to_string(seq2) + R"(,"deliveries":3})",
                                       never.get_token()));
  CHECK_FALSE(path.dead_letter_from_advisory("not json", never.get_token()));
  CHECK_FALSE(path.dead_letter_from_advisory(R"({"stream_seq":0})", never.get_token()));
  CHECK(path.dead_lettered() == 2);
  CHECK(path.failures() == 0);
  const auto letters = f.letters();
  REQUIRE(letters.size() == 2);
  CHECK(letters[0].context.reason == DlqReason::max_deliveries);
  CHECK(letters[0].context.sequence == seq);
  CHECK(letters[0].context.deliveries == 7);
  CHECK(letters[0].context.consumer == kDurable);
  CHECK(letters[1].context.sequence == seq2);
}

TEST_CASE("an advisory the DLQ refuses is given up on, at once when stop is requested") {
  Fixture f;  // no DLQ stream
  const uint64_t seq = f.pull->publish("test.orders.order.created", envelope_body("order.created"));
  DeadLetterPath path(f.connection, f.dlq, kDurable, kEvents, "", Backoff::list({Millis{100}}));
  std::stop_source stop;
  stop.request_stop();
  const auto started = Clock::now();
  CHECK_FALSE(path.dead_letter_from_advisory(R"({"stream_seq":)" + std::to_string(seq) + "}", stop.get_token()));
  CHECK(Clock::now() - started < 2s);
  CHECK(path.failures() == 1);
  CHECK(path.dead_lettered() == 0);
}

TEST_CASE("replay headers: origin and message id restored") {
  Headers h{{kReplayOriginalSubjectHeader, "a.b.c"},
            {kReplayOriginalStreamHeader, "S"},
            {kReplayOriginalSequenceHeader, "12"},
            {kOriginalMsgIdHeader, "orig"},
            {"Nats-Msg-Id", "replay"}};
  std::string subject = "replay.x";
  std::string stream = "R";
  uint64_t sequence = 3;
  detail::restore_origin(h, subject, stream, sequence);
  CHECK(subject == "a.b.c");
  CHECK(stream == "S");
  CHECK(sequence == 12);
  // A sequence that does not parse leaves stream and sequence as they were.
  Headers bad{{kReplayOriginalStreamHeader, "S"}, {kReplayOriginalSequenceHeader, "12x"}};
  stream = "R";
  sequence = 3;
  detail::restore_origin(bad, subject, stream, sequence);
  CHECK(stream == "R");
  CHECK(sequence == 3);

  detail::restore_msg_id(h);
  CHECK(h.at("Nats-Msg-Id") == "orig");
  CHECK(h.count(kOriginalMsgIdHeader) == 0);
  Headers none{{"Nats-Msg-Id", "replay"}};
  detail::restore_msg_id(none);
  CHECK(none.count("Nats-Msg-Id") == 0);

  CHECK(detail::event_id_of("not an envelope", {{"Nats-Msg-Id", "m-1"}}) == "m-1");
  CHECK(detail::event_id_of("not an envelope", {}).empty());
  const auto env = Envelope::make("t", "orders", {{"x", 1}});
  CHECK(detail::event_id_of(env.encode(), {{"Nats-Msg-Id", "m-1"}}) == env.event_id);
}
