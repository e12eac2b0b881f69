#pragma once
// What natspubsub-relay and natspubsub-dlq share: the NATS connection flags (each also read
// from an environment variable), logging set-up, and exit codes.
#include <string>

#include <CLI/CLI.hpp>

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
void setup_logging(const std::string& format, const std::string& tool_name);

/// A library built without PostgreSQL (NATSPUBSUB_WITH_POSTGRES=OFF) and a postgres:// or
/// postgresql:// `database_url`: logs one line saying so (without the URL, which may hold a
/// password) and returns true; the tool then exits kExitUsage. Always false with PostgreSQL.
[[nodiscard]] bool refuse_postgres_without_support(const std::string& database_url, const std::string& tool_name);

}  // namespace natspubsub::workers
