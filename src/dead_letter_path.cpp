#include "dead_letter_path.hpp"

#include <algorithm>
#include <charconv>
#include <chrono>
#include <condition_variable>

#include <nlohmann/json.hpp>

#include <natspubsub/connection.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/log.hpp>

#include "nats_util.hpp"

namespace natspubsub::detail {
namespace {

constexpr int kAdvisoryPublishTries = 5;

}  // namespace

DeadLetterPath::DeadLetterPath(Connection& connection, const DlqPublisher& dlq, std::string durable,
                               std::string stream, std::string replay_of, Backoff backoff)
    : connection_(&connection),
      dlq_(&dlq),
      durable_(std::move(durable)),
      stream_(std::move(stream)),
      replay_of_(std::move(replay_of)),
      backoff_(std::move(backoff)) {}

bool DeadLetterPath::dead_letter(Delivery& d, const Message& m, DlqReason reason, const std::string& error_class,
                                 const std::string& error_message) {
  DeadLetter letter;
  letter.original_subject = m.subject;
  letter.body = m.body;
  letter.headers = m.headers;
  if (!replay_of_.empty()) restore_msg_id(letter.headers);
  auto& c = letter.context;
  c.event_id = !m.envelope.event_id.empty() ? m.envelope.event_id : letter.headers["Nats-Msg-Id"];
  if (c.event_id.empty()) letter.headers.erase("Nats-Msg-Id");
  c.reason = reason;
  c.error_class = error_class;
  c.error_message = error_message;
  c.deliveries = m.metadata.deliveries;
  c.original_subject = m.subject;
  c.stream = m.metadata.stream;
  c.sequence = m.metadata.stream_sequence;
  c.consumer = owner();
  if (!replay_of_.empty()) {
    // A failed replay points at the original in its stream, and is a new letter (replay_sequence).
    c.replay_sequence = m.metadata.stream_sequence;
    std::string subject = m.subject;
    restore_origin(m.headers, subject, c.stream, c.sequence);
  }
  try {
    auto stored = dlq_->publish(letter);
    d.term();
    forget_pending_letter(m.metadata.stream_sequence);
    dead_lettered_++;
    logger()->error("{}: event {} (seq {}, delivery {}) dead-lettered as {} to {}{}: {}{}{}", durable_, c.event_id,
                    c.sequence, c.deliveries, to_string(reason), stored.subject,
                    stored.duplicate ? " (already there)" : "", error_class, error_class.empty() ? "" : ": ",
                    error_message);
    return true;
  } catch (const std::exception& e) {
    failures_++;
    bool first_refusal = false;
    {
      std::lock_guard lock(letters_mutex_);
      // Entries of messages another instance dead-lettered are never erased here; bound the map.
      // A forgotten entry costs the letter its reason, not its message: the delivery count
      // still sends it to the DLQ.
      if (pending_letters_.size() >= 100000) pending_letters_.clear();
      first_refusal = pending_letters_
                          .insert_or_assign(m.metadata.stream_sequence, PendingLetter{reason, error_class, error_message})
                          .second;
    }
    const auto delay = backoff_.delay(std::max<uint64_t>(1, m.metadata.deliveries));
    d.nak(delay);
    // An outage refuses every redelivery: the first refusal of a message is the error, the
    // rest would flood the log.
    logger()->log(first_refusal ? spdlog::level::err : spdlog::level::debug,
                  "{}: event {} (seq {}, delivery {}) could not be dead-lettered as {} ({}); NAKed, tried again "
                  "in {} ms",
                  durable_, c.event_id, c.sequence, c.deliveries, to_string(reason), e.what(), delay.count());
    return false;
  }
}

std::optional<PendingLetter> DeadLetterPath::pending_letter(uint64_t sequence) const {
  std::lock_guard lock(letters_mutex_);
  auto it = pending_letters_.find(sequence);
  if (it == pending_letters_.end()) return std::nullopt;
  return it->second;
}

void DeadLetterPath::forget_pending_letter(uint64_t sequence) {
  std::lock_guard lock(letters_mutex_);
  pending_letters_.erase(sequence);
}

// The server gave up on a message (finite max_deliver only) without a verdict from us. Read it
// by sequence and dead-letter it; the DLQ Nats-Msg-Id makes a second writer of the same letter
// harmless. If the DLQ refuses it for ~3 s the message stays in its stream, undelivered: that
// is the risk a finite max_deliver takes, and why the default is unlimited.
bool DeadLetterPath::dead_letter_from_advisory(const std::string& text, const std::stop_token& st) {
  auto j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    logger()->warn("{}: unreadable MAX_DELIVERIES advisory: {}", durable_, text);
    return false;
  }
  const uint64_t seq = j.value("stream_seq", uint64_t{0});
  const uint64_t deliveries = j.value("deliveries", uint64_t{0});
  const std::string stream = j.value("stream", stream_);
  if (seq == 0) return false;

  natsMsg* raw = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus status = js_GetMsg(&raw, connection_->jetstream(), stream.c_str(), seq, nullptr, &jerr);
  MsgPtr stored(raw);
  if (status != NATS_OK) {
    logger()->error("{}: message {} of stream {} reached MaxDeliver but cannot be read ({}); not dead-lettered",
                    durable_, seq, stream, last_error_text(status));
    return false;
  }
  DeadLetter letter;
  letter.original_subject = natsMsg_GetSubject(stored.get());
  letter.body = body_of(stored.get());
  letter.headers = read_headers(stored.get());
  auto& c = letter.context;
  c.event_id = event_id_of(letter.body, letter.headers);
  c.reason = DlqReason::max_deliveries;
  c.error_message = "delivered " + std::to_string(deliveries) +
                    " times (MaxDeliver) without a verdict: the handler crashed, hung past ack_wait, or its ack was lost";
  c.deliveries = deliveries;
  c.original_subject = letter.original_subject;
  c.stream = stream;
  c.sequence = seq;
  c.consumer = owner();
  if (!replay_of_.empty()) {
    restore_msg_id(letter.headers);
    c.event_id = event_id_of(letter.body, letter.headers);
    c.replay_sequence = seq;
    restore_origin(letter.headers, letter.original_subject, c.stream, c.sequence);
  }
  c.original_subject = letter.original_subject;

  Millis pause{200};
  std::mutex wait_mutex;
  std::condition_variable_any wait_cv;
  for (int attempt = 1; attempt <= kAdvisoryPublishTries; ++attempt) {
    try {
      auto r = dlq_->publish(letter);
      if (!r.duplicate) dead_lettered_++;
      logger()->error("{}: event {} (seq {}) reached MaxDeliver ({}); dead-lettered to {}{}", durable_, c.event_id, seq,
                      deliveries, r.subject, r.duplicate ? " (already there)" : "");
      return !r.duplicate;
    } catch (const std::exception& e) {
      logger()->warn("{}: dead-lettering seq {} after MaxDeliver failed (try {}/{}): {}", durable_, seq, attempt,
                     kAdvisoryPublishTries, e.what());
    }
    std::unique_lock lock(wait_mutex);
    wait_cv.wait_for(lock, st, pause, [] { return false; });
    if (st.stop_requested()) break;
    pause *= 2;
  }
  failures_++;
  logger()->error("{}: event {} reached MaxDeliver and could not be dead-lettered; it stays in stream {} at "
                  "sequence {} (the server will not deliver it again)",
                  durable_, c.event_id, stream, seq);
  return false;
}

void restore_origin(const Headers& headers, std::string& subject, std::string& stream, uint64_t& sequence) {
  auto get = [&](const char* key) -> const std::string* {
    auto it = headers.find(key);
    return it == headers.end() || it->second.empty() ? nullptr : &it->second;
  };
  if (const auto* v = get(kReplayOriginalSubjectHeader)) subject = *v;
  const auto* st = get(kReplayOriginalStreamHeader);
  const auto* sq = get(kReplayOriginalSequenceHeader);
  if (st != nullptr && sq != nullptr) {
    uint64_t n = 0;
    auto [end, ec] = std::from_chars(sq->data(), sq->data() + sq->size(), n);
    if (ec == std::errc() && end == sq->data() + sq->size()) {
      stream = *st;
      sequence = n;
    }
  }
}

void restore_msg_id(Headers& headers) {
  auto it = headers.find(kOriginalMsgIdHeader);
  if (it != headers.end() && !it->second.empty())
    headers["Nats-Msg-Id"] = it->second;
  else
    headers.erase("Nats-Msg-Id");
  headers.erase(kOriginalMsgIdHeader);
}

std::string event_id_of(const std::string& body, const Headers& headers) {
  try {
    return Envelope::decode(body).event_id;
  } catch (...) {
    // Not an envelope: the publisher's dedup id is the best name we have.
    auto it = headers.find("Nats-Msg-Id");
    return it == headers.end() ? std::string() : it->second;
  }
}

}  // namespace natspubsub::detail
