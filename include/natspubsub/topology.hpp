#pragma once
// Streams and durable consumers, made to match what the application declares.
//
//   natspubsub::Topology topology(connection);
//   auto events = topology.ensure_events_stream();   // "{env}-{app}-events" on "{env}.{app}.>"
//   auto consumer = topology.ensure_consumer(
//       natspubsub::Topology::consumer_spec(config, "test.orders.order.created"));
//
// Rules: a stream whose subjects overlap another stream's is refused (OverlapError names both),
// except that an existing stream which already captures every subject we need is adopted (the
// NatsPubsub JavaScript/Ruby `{env}-events-stream` layout). An existing stream is never weakened:
// differences in replicas, retention, storage or limits are logged and reported, not applied.
// A consumer whose new config the server refuses is an error unless `recreate` is asked.
//
// In the natspubsub topology mode (Config::topology) the events stream is NatsPubsub's
// "{env}-events-stream" and durables carry NatsPubsub's names; a durable found with another
// configuration is adopted as it is (differences logged and reported in `not_applied`), because
// the NatsPubsub instances sharing it expect their own settings.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <natspubsub/config.hpp>

namespace natspubsub {

class Connection;

enum class Retention { limits, interest, work_queue };

struct StreamSpec {
  std::string name;
  std::vector<std::string> subjects;
  Retention retention = Retention::limits;
  bool memory_storage = false;
  int replicas = 1;
  Millis duplicate_window{120000};
  Millis max_age{0};      ///< 0: unlimited
  int64_t max_bytes = -1;
  int64_t max_msgs = -1;
  int32_t max_msg_size = -1;
  std::string description;
};

struct ConsumerSpec {
  std::string stream;          ///< empty: the stream whose subjects capture filter_subject
  std::string durable;
  std::string filter_subject;
  Millis ack_wait{30000};
  int64_t max_deliver = -1;    ///< -1: unlimited
  std::vector<Millis> backoff; ///< server-side redelivery delays after ack timeouts (optional)
  int64_t max_ack_pending = 1000;
  std::string description;
  /// An existing durable with other settings is used as found instead of updated (the
  /// natspubsub topology mode). A different filter subject, a push consumer or an ack policy
  /// other than explicit is still an error: such a durable cannot serve this subscription.
  bool adopt_existing = false;
};

enum class EnsureAction { created, updated, unchanged, adopted, recreated };
[[nodiscard]] const char* to_string(EnsureAction action) noexcept;

struct StreamResult {
  EnsureAction action = EnsureAction::unchanged;
  std::string stream;                    ///< the stream in use (the adopted one when adopted)
  std::vector<std::string> subjects;     ///< its subjects after the call
  std::vector<std::string> changes;      ///< what was applied ("subjects: +a.b.>")
  std::vector<std::string> not_applied;  ///< differences kept as the operator made them
};

struct ConsumerResult {
  EnsureAction action = EnsureAction::unchanged;
  std::string stream;
  std::string durable;
  std::vector<std::string> changes;
  std::vector<std::string> not_applied;  ///< differences of an adopted durable, kept as found
  Millis ack_wait{0};                    ///< the durable's settings on the server after the call
  int64_t max_deliver = -1;
  int64_t max_ack_pending = -1;
};

struct StreamSummary {
  std::string name;
  std::vector<std::string> subjects;
  uint64_t messages = 0;
  uint64_t first_sequence = 0;
  uint64_t last_sequence = 0;
  int replicas = 1;
};

/// Borrows a Connection; the connection must outlive it.
class Topology {
 public:
  explicit Topology(Connection& connection);

  /// The events stream of the configured app: name "{env}-{app}-events", subjects "{env}.{app}.>".
  /// In the natspubsub mode: "{env}-events-stream" with "{env}.events.>" and "{env}.{app}.>".
  [[nodiscard]] static StreamSpec events_stream_spec(const Config& config);
  /// The DLQ stream of the configured app: name "{env}-{app}-dlq", subjects "dlq.{env}.{app}.>".
  [[nodiscard]] static StreamSpec dlq_stream_spec(const Config& config);
  /// The replay stream of the configured app: name "{env}-{app}-replay", subjects
  /// "replay.{env}.{app}.>", work-queue retention. natspubsub-dlq replays a dead letter into it on
  /// the failed durable's replay subject (dlq.hpp: replay_subject), so only that consumer sees it.
  [[nodiscard]] static StreamSpec replay_stream_spec(const Config& config);
  /// "{env}-{app}-{filter made safe}"; in the natspubsub mode "{app}_{filter with '.', '*', '>' -> '_'}"
  /// (app billing, filter acc.orders.order.created: "billing_acc_orders_order_created").
  [[nodiscard]] static std::string consumer_name(const Config& config, std::string_view filter_subject);
  /// A durable pull consumer spec for `filter_subject` with the config's consumer defaults.
  /// MaxDeliver is unlimited (-1): the consumer runtime counts attempts and dead-letters a message
  /// past max_attempts itself, so the server never stops delivering a message first.
  [[nodiscard]] static ConsumerSpec consumer_spec(const Config& config, std::string filter_subject);

  StreamResult ensure_stream(const StreamSpec& spec);
  StreamResult ensure_events_stream();
  StreamResult ensure_dlq_stream();
  StreamResult ensure_replay_stream();
  /// Natspubsub mode: the shared events stream, with "{env}.{app}.>" of another app added. A
  /// NatsPubsub app that starts after the stream exists never adds its own subjects, so its
  /// publishes would find no stream; Consumer::start() calls this for the apps it subscribes to.
  StreamResult ensure_app_subjects(std::string_view app);
  ConsumerResult ensure_consumer(const ConsumerSpec& spec, bool recreate = false);

  /// Every stream on the server with its subjects.
  [[nodiscard]] std::vector<StreamSummary> streams() const;
  /// The stream whose subjects capture every subject `filter` matches; nullopt when none.
  [[nodiscard]] std::optional<std::string> stream_for(std::string_view filter) const;
  [[nodiscard]] StreamSummary stream_info(const std::string& name) const;
  /// True when the durable exists on the stream.
  [[nodiscard]] bool consumer_exists(const std::string& stream, const std::string& durable) const;
  void delete_consumer(const std::string& stream, const std::string& durable);

 private:
  StreamResult ensure_stream(const StreamSpec& spec, int retries_left);
  Connection* connection_;
};

}  // namespace natspubsub
