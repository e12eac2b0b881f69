#pragma once
// The dead-letter path of one subscription: builds the dead letter of a message, publishes it to
// the DLQ and waits for the PubAck, then TERMs the message. When the DLQ does not take it, the
// message is NAKed with the backoff delay and the decision is kept (pending_letter()):
// Subscription::process() publishes that letter again on the message's next delivery instead of
// running the handler.
// Also dead-letters a message named by a MAX_DELIVERIES advisory (finite max_deliver only).
// Not installed. Test: tests/dead_letter_path_test.cpp.
//
//   DeadLetterPath letters(connection, dlq, "orders-created", "orders-events", "", backoff);
//   if (!letters.dead_letter(delivery, message, DlqReason::permanent_error, "E", "why")) {
//     // NAKed with the backoff delay; letters.pending_letter(seq) holds the decision
//   }
#include <atomic>
#include <cstdint>
#include <mutex>
#include <optional>
#include <stop_token>
#include <string>
#include <unordered_map>

#include <natspubsub/backoff.hpp>
#include <natspubsub/dlq.hpp>
#include <natspubsub/message.hpp>

#include "delivery.hpp"

namespace natspubsub {
class Connection;
}

namespace natspubsub::detail {

/// A decision to dead-letter, kept until the DLQ acknowledged the letter.
struct PendingLetter {
  DlqReason reason = DlqReason::permanent_error;
  std::string error_class;
  std::string error_message;
};

class DeadLetterPath {
 public:
  /// `durable` names the subscription in logs; `stream` is the stream it reads (an advisory
  /// naming no stream means this one); `replay_of`, when not empty, is the durable whose replays
  /// it reads: letters then name that durable and point at the original message.
  /// Borrows `connection` and `dlq`, which must outlive it.
  DeadLetterPath(Connection& connection, const DlqPublisher& dlq, std::string durable, std::string stream,
                 std::string replay_of, Backoff backoff);
  DeadLetterPath(const DeadLetterPath&) = delete;
  DeadLetterPath& operator=(const DeadLetterPath&) = delete;

  /// DLQ publish, PubAck, then TERM (`d` -> dead_lettered); true when the DLQ took the letter.
  /// Otherwise NAKs `d` with backoff.delay(deliveries) (`d` -> naked), remembers the decision
  /// under the message's stream sequence, and returns false.
  bool dead_letter(Delivery& d, const Message& m, DlqReason reason, const std::string& error_class,
                   const std::string& error_message);

  /// The decision dead_letter() remembered for this stream sequence, if the DLQ refused it.
  [[nodiscard]] std::optional<PendingLetter> pending_letter(uint64_t sequence) const;

  /// Reads the message a MAX_DELIVERIES advisory (JSON `text`) names from its stream and
  /// dead-letters it as max_deliveries, trying the DLQ up to 5 times over about 3 s (ended early
  /// by `st`). True when a new letter was stored (false: a duplicate, unreadable, or refused).
  bool dead_letter_from_advisory(const std::string& text, const std::stop_token& st);

  /// Letters the DLQ stored (from dead_letter(), and new ones from dead_letter_from_advisory()).
  [[nodiscard]] uint64_t dead_lettered() const noexcept { return dead_lettered_; }
  /// Letters the DLQ refused (each refused dead_letter() call; each advisory given up on).
  [[nodiscard]] uint64_t failures() const noexcept { return failures_; }
  /// The durable that owns the messages: replay_of for a replay route.
  [[nodiscard]] const std::string& owner() const noexcept { return replay_of_.empty() ? durable_ : replay_of_; }

 private:
  void forget_pending_letter(uint64_t sequence);

  Connection* connection_;
  const DlqPublisher* dlq_;
  const std::string durable_;
  const std::string stream_;
  const std::string replay_of_;
  const Backoff backoff_;
  std::atomic<uint64_t> dead_lettered_{0}, failures_{0};

  // Stream sequence -> the dead letter decided here but not taken by the DLQ (the message was
  // NAKed). In memory only: elsewhere, or after a restart, the delivery count decides.
  mutable std::mutex letters_mutex_;
  std::unordered_map<uint64_t, PendingLetter> pending_letters_;
};

/// A replay carries where the original was (x-original-subject, -stream, -sequence): sets
/// `subject`, and `stream` and `sequence` when both headers are present and the sequence parses.
void restore_origin(const Headers& headers, std::string& subject, std::string& stream, uint64_t& sequence);

/// A replay's Nats-Msg-Id is its own; the original's travels in x-original-msg-id. Puts that one
/// back as Nats-Msg-Id (or removes Nats-Msg-Id when there is none) and removes x-original-msg-id.
void restore_msg_id(Headers& headers);

/// The envelope's event_id, else the Nats-Msg-Id header, else empty.
[[nodiscard]] std::string event_id_of(const std::string& body, const Headers& headers);

}  // namespace natspubsub::detail
