#pragma once
// Dead letters: messages that cannot succeed, kept in the consuming app's DLQ stream with
// everything needed to understand and replay them.
//
// A DLQ message keeps the original body and headers and adds:
//   x-dead-letter: true
//   x-dlq-reason:  malformed | permanent_error | attempts_exhausted | max_deliveries (a reader keeps
//                  any other value as written: DlqReason::other with DlqContext::reason_name)
//   x-deliveries:  how many times JetStream delivered the original
//   x-dlq-context: JSON {event_id, reason, error_class, error_message, deliveries, original_subject,
//                        stream, sequence, consumer, published_at, raw_base64, ...}
// Its subject is "dlq.{env}.{consuming app}.{original subject}" and its Nats-Msg-Id is
// "dlq-{stream}-{sequence}-{consumer}", so the same original dead-lettered twice by one durable
// (two instances, a retry after a lost PubAck) is stored once, while two durables of the app that
// both fail on it each keep their own dead letter.
//
//   natspubsub::DlqPublisher dlq(connection);
//   natspubsub::DeadLetter letter;
//   letter.original_subject = "production.orders.order.created";
//   letter.body = body;
//   letter.context.reason = natspubsub::DlqReason::permanent_error;
//   letter.context.stream = "production-orders-events";
//   letter.context.sequence = 42;
//   dlq.publish(letter);                                   // waits for the PubAck or throws
//
//   auto back = natspubsub::parse_dead_letter(subject, body, headers);   // the DLQ tool reads them
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include <natspubsub/config.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/publisher.hpp>

namespace natspubsub {

class Connection;

inline constexpr const char* kDeadLetterHeader = "x-dead-letter";
inline constexpr const char* kDlqReasonHeader = "x-dlq-reason";
inline constexpr const char* kDeliveriesHeader = "x-deliveries";
inline constexpr const char* kDlqContextHeader = "x-dlq-context";
/// The original Nats-Msg-Id (the DLQ message carries its own, "dlq-{stream}-{sequence}-{consumer}").
inline constexpr const char* kOriginalMsgIdHeader = "x-original-msg-id";

// A replay (natspubsub-dlq replay) goes to the consumer that failed, not to every consumer of the
// subject: it is published to that durable's replay subject "replay.{env}.{app}.{route}" in the
// app's replay stream "{env}-{app}-replay" (work-queue retention: gone once handled), which the
// consumer runtime reads with a second durable named {route} and the same handler, middleware and
// inbox. {route} = replay_durable(stream, durable): durable names are per stream, so the route
// names both (two subscriptions called "worker" on two streams get two routes). These headers
// carry the original's coordinates: the runtime shows the replay to the handler under the original
// subject and the failed durable's name (its metadata stays the replay's own delivery), and a
// replay that fails again is dead-lettered pointing at the original's stream and sequence.
inline constexpr const char* kReplayedFromHeader = "x-replayed-from";            ///< "{dlq stream}:{seq}"
inline constexpr const char* kReplayOriginalSubjectHeader = "x-original-subject";
inline constexpr const char* kReplayOriginalStreamHeader = "x-original-stream";
inline constexpr const char* kReplayOriginalSequenceHeader = "x-original-sequence";

/// The durable that reads the replays of `durable` on `stream`: "{durable}-{8 hex digits of a hash
/// of stream and durable}-replay", the durable cut to 200 characters (names stay within 255).
[[nodiscard]] std::string replay_durable(std::string_view stream, std::string_view durable);
/// "replay.{env}.{app}.{replay_durable(stream, durable)}": where such a replay is published.
[[nodiscard]] std::string replay_subject(const Config& config, std::string_view stream, std::string_view durable);

/// error_message is cut to this many bytes in the context, so a huge exception text cannot
/// push a dead letter over the server's max_payload.
inline constexpr size_t kMaxDlqErrorMessage = 1024;

enum class DlqReason {
  malformed,           ///< the body is not a valid envelope; never retried
  permanent_error,     ///< the handler threw PermanentError, or an error-policy rule said so
  attempts_exhausted,  ///< the handler failed on its last allowed attempt
  max_deliveries,      ///< delivered past max_attempts without a verdict (crash loop, hung handler), or the
                       ///< server's MaxDeliver advisory with a finite max_deliver
  other,               ///< a reason this version does not know (a newer writer): see DlqContext::reason_name
};

[[nodiscard]] const char* to_string(DlqReason reason) noexcept;
/// nullopt for an unknown name.
[[nodiscard]] std::optional<DlqReason> parse_dlq_reason(std::string_view name) noexcept;

/// A DLQ message could not be read back (no x-dead-letter header, bad x-dlq-context JSON, ...).
class DlqFormatError : public Error {
 public:
  using Error::Error;
};

/// The x-dlq-context JSON.
struct DlqContext {
  std::string event_id;           ///< from the envelope, else the original Nats-Msg-Id, else empty
  DlqReason reason = DlqReason::permanent_error;
  /// The reason as written in the letter; what to_json() writes when reason is `other`.
  std::string reason_name;
  std::string error_class;        ///< the exception type, e.g. "natspubsub::PermanentError"
  std::string error_message;      ///< at most kMaxDlqErrorMessage bytes
  uint64_t deliveries = 0;
  std::string original_subject;
  std::string stream;             ///< where the original still is
  uint64_t sequence = 0;
  std::string consumer;
  /// When the failed message was a replay (natspubsub-dlq replay): its sequence in the replay
  /// stream. Part of the DLQ Nats-Msg-Id, so a replay that fails again is a new dead letter, not a
  /// duplicate of the one it was replayed from. 0 otherwise.
  uint64_t replay_sequence = 0;
  SystemTime published_at{};      ///< when the dead letter was written
  std::string raw_base64;         ///< the original body, base64; empty when raw_omitted
  bool raw_omitted = false;       ///< raw_base64 left out to stay within max_payload (the body has the bytes)
  bool body_omitted = false;      ///< even the body did not fit: read the original at stream/sequence
  bool error_message_truncated = false;

  /// The reason as text: reason_name for `other`, else to_string(reason).
  [[nodiscard]] std::string reason_text() const;
  [[nodiscard]] nlohmann::json to_json() const;
  /// Throws DlqFormatError when a required field is missing or has the wrong type.
  [[nodiscard]] static DlqContext from_json(const nlohmann::json& j);
};

/// One dead letter: the original message and why it failed.
struct DeadLetter {
  std::string original_subject;
  std::string body;               ///< the original body
  Headers headers;                ///< the original headers (without the x-dlq ones)
  DlqContext context;

  /// The Nats-Msg-Id of the DLQ message: "dlq-{stream}-{sequence}-{consumer}" ("dlq-{stream}-{sequence}"
  /// when the consumer is empty), plus "-replay-{replay_sequence}" for a failed replay.
  [[nodiscard]] std::string msg_id() const;
};

/// "dlq.{env}.{app}.{original subject}" for the app of `config` (the consuming app).
[[nodiscard]] std::string dlq_subject(const Config& config, std::string_view original_subject);

/// Builds the DLQ message for `letter` on `subject`, keeping header block + body within
/// `max_payload` bytes by rule: error_message is cut to kMaxDlqErrorMessage; then, if too big,
/// raw_base64 is left out (raw_omitted); then the body (body_omitted); then the original headers.
/// context.raw_base64 is filled from the body here; what the caller set there is ignored.
[[nodiscard]] RawMessage make_dlq_message(const DeadLetter& letter, const std::string& subject, size_t max_payload);

/// Reads a message taken from a DLQ stream. Throws DlqFormatError when it is not a dead letter.
/// When the body was omitted but raw_base64 is present, the body is restored from it.
[[nodiscard]] DeadLetter parse_dead_letter(std::string_view subject, std::string_view body, const Headers& headers);

/// Bytes a message occupies against max_payload: the NATS header block plus the body.
[[nodiscard]] size_t wire_size(const Headers& headers, size_t body_size);

[[nodiscard]] std::string base64_encode(std::string_view bytes);
/// Throws DlqFormatError on characters outside the standard alphabet or bad padding.
[[nodiscard]] std::string base64_decode(std::string_view text);

/// Publishes dead letters of the configured app (borrows the Connection, which must outlive it).
/// Thread-safe.
class DlqPublisher {
 public:
  /// `subject_prefix` defaults to "dlq.{env}.{app}".
  explicit DlqPublisher(Connection& connection, std::string subject_prefix = {});

  /// Publishes and waits for the PubAck. Returns where it was stored (duplicate = true when the
  /// same dead letter was already there). Throws PublishError (no DLQ stream captures the
  /// subject, refused), TimeoutError or ConnectionError.
  PublishResult publish(const DeadLetter& letter) const;

  [[nodiscard]] std::string subject_for(std::string_view original_subject) const;

 private:
  Connection* connection_;
  std::string prefix_;
};

}  // namespace natspubsub
