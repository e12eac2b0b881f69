#pragma once
// Configuration of a natspubsub process: where NATS is, who we are (env, app), credentials, TLS,
// and the defaults for streams and consumers. A value type: build it in code, from a JSON file or
// from NATSPUBSUB_* environment variables, then call validate().
//
//   auto config = natspubsub::Config::production("orders");
//   config.servers = {"nats://10.0.0.1:4222", "nats://10.0.0.2:4222"};
//   config.credentials.creds_file = "/etc/orders/nats.creds";
//   config.validate();  // throws ConfigError naming the field and the rule
//
// Secrets (password, token, and userinfo in server URLs) never appear in error messages or
// logs: use redacted_json() or redact_url() to show a configuration.
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace natspubsub {

using Millis = std::chrono::milliseconds;

struct Credentials {
  std::string user;            ///< with password
  std::string password;        ///< secret
  std::string token;           ///< secret
  std::string nkey_public_key;  ///< the user's public nkey ("U..."), with nkey_seed_file
  std::string nkey_seed_file;  ///< file holding the nkey seed (the seed itself is never kept here)
  std::string creds_file;      ///< a .creds file (user JWT + nkey seed)
};

struct TlsSettings {
  bool enabled = false;  ///< implied when any file below is set or a server URL is tls://
  std::string ca_file;
  std::string cert_file;  ///< client certificate (with key_file)
  std::string key_file;
  std::string expected_hostname;  ///< when it differs from the host in the server URL
};

struct ConnectionSettings {
  std::string name;                     ///< client name shown by the server; default "{env}-{app}"
  Millis connect_timeout{2000};
  Millis reconnect_wait{1000};          ///< base wait between reconnect attempts
  Millis reconnect_jitter{500};         ///< random extra wait, up to this much
  int max_reconnect_attempts = -1;      ///< -1: reconnect forever
  int reconnect_buffer_bytes = 8 * 1024 * 1024;  ///< publishes buffered while reconnecting
  Millis ping_interval{20000};
  bool retry_on_failed_connect = false; ///< keep trying when the first connect fails
  Millis jetstream_timeout{5000};       ///< JetStream API calls and sync publish acks
};

struct StreamDefaults {
  int replicas = 1;                     ///< 3 on a cluster
  bool memory_storage = false;          ///< file storage unless set
  Millis duplicate_window{120000};      ///< JetStream deduplication window (Nats-Msg-Id)
  Millis max_age{0};                    ///< 0: unlimited
  int64_t max_bytes = -1;               ///< -1: unlimited
  int64_t max_msgs = -1;                ///< -1: unlimited
};

struct ConsumerDefaults {
  int concurrency = 4;                  ///< handlers running at once per subscription
  int max_attempts = 5;                 ///< handler attempts before the DLQ
  Millis ack_wait{30000};
  int max_ack_pending = 1000;
  std::vector<Millis> backoff{Millis{1000}, Millis{5000}, Millis{30000}, Millis{120000}};  ///< delay before attempt n+1
  Millis fetch_timeout{1000};           ///< how long one pull request waits for messages
};

/// Which names the library gives streams and durables.
///  - standard: a stream per publishing app, "{env}-{app}-events" on "{env}.{app}.>"; durables
///    "{env}-{consuming app}-{filter made safe}".
///  - natspubsub: the names of the NatsPubsub JavaScript/Ruby libraries, so services in both
///    languages share one stream and one durable per subscription: the stream
///    "{env}-events-stream" on "{env}.events.>" plus each app's "{env}.{app}.>", durables
///    "{app}_{filter with '.', '*' and '>' replaced by '_'}" (README: "Mixed deployments").
enum class TopologyMode { standard, natspubsub };
[[nodiscard]] const char* to_string(TopologyMode mode) noexcept;
/// "standard" or "natspubsub"; ConfigError naming `field` otherwise.
[[nodiscard]] TopologyMode parse_topology_mode(std::string_view text, const std::string& field = "topology");

struct Config {
  std::vector<std::string> servers{"nats://127.0.0.1:4222"};
  std::string env = "development";
  std::string app;
  TopologyMode topology = TopologyMode::standard;
  Credentials credentials;
  TlsSettings tls;
  ConnectionSettings connection;
  StreamDefaults stream;
  ConsumerDefaults consumer;

  /// Local work: one server, R1 file streams, short backoff.
  [[nodiscard]] static Config development(std::string app);
  /// Production: env "production", R3 streams, longer backoff, reconnect forever.
  [[nodiscard]] static Config production(std::string app);
  /// Tests: env "test", memory streams, backoff in tens of milliseconds.
  [[nodiscard]] static Config testing(std::string app);
  /// The preset by name ("development", "production", "testing"); ConfigError otherwise.
  [[nodiscard]] static Config preset(std::string_view name, std::string app);

  /// Reads the JSON form (see to_json()). Unknown keys are errors, so typos are not ignored.
  /// A "preset" key picks the starting point; other keys override it.
  [[nodiscard]] static Config from_json(const nlohmann::json& j);
  [[nodiscard]] static Config from_json_file(const std::filesystem::path& path);
  /// Applies NATSPUBSUB_* variables (and NATS_URL) on top of `base`. See README for the list.
  [[nodiscard]] static Config from_env(Config base);
  [[nodiscard]] static Config from_env();

  /// Throws ConfigError naming the first bad field and its rule. Never includes secret values.
  void validate() const;

  /// Full JSON form; includes secrets. For display use redacted_json().
  [[nodiscard]] nlohmann::json to_json() const;
  /// JSON form with password, token and URL userinfo replaced by "***".
  [[nodiscard]] nlohmann::json redacted_json() const;

  /// "{env}.{app}.{topic}" (validated).
  [[nodiscard]] std::string subject(std::string_view topic) const;
  /// "{env}-{app}-events"; "{env}-events-stream" in the natspubsub topology mode.
  [[nodiscard]] std::string events_stream_name() const;
  /// "{env}-{app}-dlq"
  [[nodiscard]] std::string dlq_stream_name() const;
  /// The client name sent to the server.
  [[nodiscard]] std::string client_name() const;
};

/// "nats://user:secret@host:4222" -> "nats://***@host:4222". Other URLs are returned unchanged.
[[nodiscard]] std::string redact_url(std::string_view url);

}  // namespace natspubsub
