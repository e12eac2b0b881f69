#pragma once
// The DLQ stream as natspubsub-dlq sees it: found by the subjects it must hold (so an adopted
// stream is found too), read in one pass with an ordered consumer, letters deleted one by one,
// and the original of a letter read back from its own stream.
//
//   auto dlq = DeadLetterStream::locate(nats, config);   // throws DlqStreamMissing
//   dlq.scan([&](DlqEntry&& e) { ... return true; }, progress);
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <natspubsub/connection.hpp>
#include <natspubsub/dlq.hpp>
#include <natspubsub/error.hpp>

namespace natspubsub::workers {

/// No stream holds the app's DLQ subjects (a mistyped --env or --app, or a consumer never started).
class DlqStreamMissing : public Error {
 public:
  using Error::Error;
};

/// How the letters of a stream are written.
enum class DlqFormat {
  natspubsub,     ///< this library: original body and headers, x-dlq-context (dlq.hpp)
  natspubsub_js,  ///< the NatsPubsub JavaScript/Ruby libraries: a JSON wrapper, see parse_natspubsub_js_letter
};
[[nodiscard]] const char* to_string(DlqFormat format) noexcept;

/// One message of the DLQ stream.
struct DlqEntry {
  std::string stream;        ///< the stream it is in
  DlqFormat format = DlqFormat::natspubsub;
  uint64_t seq = 0;
  std::string subject;       ///< the DLQ subject
  std::optional<DeadLetter> letter;  ///< nullopt when the message is no dead letter (see problem)
  std::string problem;       ///< why it is not one
  std::string topic;         ///< the original's topic (header "topic", else subject minus env.app)
};

class DeadLetterStream {
 public:
  /// Every stream holding dead letters of the app: the one whose subjects capture
  /// "dlq.{env}.{app}.>" (the default "{env}-{app}-dlq" first, else an adopted one), then
  /// NatsPubsub's "{env}-events-stream-dlq" when it captures "{env}.{app}.dlq". Throws
  /// DlqStreamMissing, naming what was looked for, when there is none.
  static std::vector<DeadLetterStream> locate_all(Connection& nats, const Config& config);

  [[nodiscard]] const std::string& name() const { return name_; }
  [[nodiscard]] const std::string& subjects() const { return filter_; }
  [[nodiscard]] uint64_t messages() const { return messages_; }
  [[nodiscard]] DlqFormat format() const { return format_; }

  /// Every message under the DLQ subjects, oldest first, in one ordered-consumer pass. `visit`
  /// returns false to stop early. `progress(done, total)` is called now and then.
  void scan(const std::function<bool(DlqEntry&&)>& visit,
            const std::function<void(uint64_t, uint64_t)>& progress = {}) const;
  /// The message at `seq`; nullopt when there is none (deleted, or outside the DLQ subjects).
  [[nodiscard]] std::optional<DlqEntry> get(uint64_t seq) const;
  /// Deletes the message at `seq`; throws NatsError.
  void remove(uint64_t seq) const;

 private:
  DeadLetterStream(Connection& nats, std::string name, std::string filter, uint64_t messages, DlqFormat format)
      : nats_(&nats), name_(std::move(name)), filter_(std::move(filter)), messages_(messages), format_(format) {}
  [[nodiscard]] bool holds(const std::string& subject) const;
  [[nodiscard]] DlqEntry entry(uint64_t seq, std::string subject, std::string body, Headers headers) const;

  Connection* nats_;
  std::string name_;
  std::string filter_;
  uint64_t messages_ = 0;
  DlqFormat format_ = DlqFormat::natspubsub;
};

/// Reads a dead letter the NatsPubsub JavaScript library wrote: headers x-dead-letter: true,
/// x-dlq-reason, x-deliveries, x-event-id; body a JSON object with event_id, original_subject,
/// payload, raw_base64 (the original bytes), headers (values a string or a list of strings),
/// deliveries, reason, error ("Name: message"), occurred_at. The original body is raw_base64
/// decoded (else payload), the headers are the wrapper's; the letter names no stream, sequence
/// or consumer. Throws DlqFormatError when it is not such a letter.
[[nodiscard]] DeadLetter parse_natspubsub_js_letter(std::string_view subject, std::string_view body,
                                                    const Headers& headers);

/// The original message of a letter, read from context.stream at context.sequence. Throws
/// DlqFormatError naming why when it is gone or is not the letter's original (another subject,
/// another Nats-Msg-Id).
struct OriginalMessage {
  std::string body;
  Headers headers;
};
[[nodiscard]] OriginalMessage read_original(Connection& nats, const DeadLetter& letter);

/// The topic shown for a letter: its "topic" header, else the subject without "{env}.{app}.".
[[nodiscard]] std::string topic_of(const DeadLetter& letter);

}  // namespace natspubsub::workers
