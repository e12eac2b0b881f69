#pragma once
// What natspubsub-relay and natspubsub-dlq share: the NATS connection flags (each also read
// from an environment variable), logging set-up, and exit codes.
#include <string>
#include <utility>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <natspubsub/config.hpp>

namespace natspubsub::workers {

/// Exit codes of both tools (documented in the README).
enum ExitCode : int {
  kExitOk = 0,
  kExitFailure = 1,      ///< the operation failed (see the error line)
  kExitUsage = 2,        ///< bad flags or arguments
  kExitConfig = 3,       ///< invalid configuration (names the field)
  kExitDatabase = 4,     ///< the database could not be opened or migrated at start
  kExitNats = 5,         ///< NATS could not be reached (or refused our credentials) at start
};

/// Flags that build a Config: --nats, --env, --app, --topology, --config, credentials and TLS.
struct NatsFlags {
  std::string config_file;
  std::string servers;
  std::string env;
  std::string app;
  std::string topology;  ///< "standard" or "natspubsub" (Config::topology)
  std::string user, password, token, creds_file, nkey_seed_file, nkey_public_key;
  std::string tls_ca, tls_cert, tls_key;

  void add_to(CLI::App& app_cli);
  /// Config from (in order) defaults, --config file, environment, flags; validated.
  [[nodiscard]] Config build() const;
};

/// "text" (default) or "json": the library's logger and the tool's lines go to stderr in that format.
/// A JSON line is {"time", "level", "logger", "msg"} followed by the process's fields
/// (set_log_fields) and the line's own (log_info), each a JSON value, not text inside `msg`.
void setup_logging(const std::string& format, const std::string& tool_name);

/// From now on every JSON line of this process (the tool's and the library's) also carries
/// `fields`, an object, e.g. {"relay_id": "...", "app": "orders", "env": "prod"}. Text lines are
/// unchanged. Any thread may call it.
void set_log_fields(const nlohmann::json& fields);

/// While one is alive, the JSON lines its thread logs also carry `fields` (an object); spdlog's
/// synchronous sinks format a line on the thread that logs it. Use log_info below.
class ScopedLogFields {
 public:
  explicit ScopedLogFields(const nlohmann::json& fields);
  ~ScopedLogFields();
  ScopedLogFields(const ScopedLogFields&) = delete;
  ScopedLogFields& operator=(const ScopedLogFields&) = delete;

 private:
  std::string previous_;
};

/// An info line whose figures are also fields of the JSON line:
///   log_info({{"published", n}}, "relayed {} row(s)", n);
///   -> {"time":...,"msg":"relayed 3 row(s)","relay_id":"...","published":3}
template <typename... Args>
void log_info(const nlohmann::json& fields, spdlog::format_string_t<Args...> format, Args&&... args) {
  ScopedLogFields scoped(fields);
  spdlog::info(format, std::forward<Args>(args)...);
}

/// A library built without PostgreSQL (NATSPUBSUB_WITH_POSTGRES=OFF) and a postgres:// or
/// postgresql:// `database_url`: logs one line saying so (without the URL, which may hold a
/// password) and returns true; the tool then exits kExitUsage. Always false with PostgreSQL.
[[nodiscard]] bool refuse_postgres_without_support(const std::string& database_url, const std::string& tool_name);

}  // namespace natspubsub::workers
