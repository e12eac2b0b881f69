#pragma once
// Real servers for tests: nats-server (single node or 3-node JetStream cluster) and a throwaway
// PostgreSQL 15. Each listens on a free 127.0.0.1 port with its data in a temporary directory,
// and every process a fixture starts is ended when the fixture is destroyed (also when a test
// fails or throws). No mocks anywhere.
//
//   natspubsub::testing::NatsServer nats;            // started and answering when constructed
//   auto url = nats.url();                            // "nats://127.0.0.1:PORT"
//   nats.kill();  nats.start();                       // SIGKILL, then restart on same port and store
//
//   natspubsub::testing::PostgresServer pg;          // initdb + postgres, ready when constructed
//   auto db = pg.create_database("outbox_test");     // "postgresql://postgres@127.0.0.1:PORT/outbox_test"
#include <chrono>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

namespace natspubsub::testing {

/// A directory under $TMPDIR (or /tmp) removed recursively on destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "natspubsub");
  /// Under `parent` instead (PostgreSQL as user postgres needs a parent it can traverse).
  TempDir(const std::string& prefix, const std::filesystem::path& parent);
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }

 private:
  std::filesystem::path path_;
};

/// A loopback TCP port that was free when asked (bound and released).
[[nodiscard]] int free_port();

class NatsServer {
 public:
  struct Options {
    bool jetstream = true;
    std::string user;           ///< with password: the server requires user/password auth
    std::string password;
    std::string token;          ///< the server requires this token
    long max_payload = 0;       ///< bytes; 0 keeps the server default (1 MiB)
    std::string extra_config;   ///< appended verbatim to the generated server config file
  };

  NatsServer();
  explicit NatsServer(Options options);
  ~NatsServer();  ///< kills the process if still running, removes the store
  NatsServer(const NatsServer&) = delete;
  NatsServer& operator=(const NatsServer&) = delete;

  [[nodiscard]] std::string url() const;  ///< "nats://127.0.0.1:PORT"
  [[nodiscard]] int port() const noexcept;
  [[nodiscard]] const std::filesystem::path& store_dir() const noexcept;
  [[nodiscard]] bool running() const noexcept;
  [[nodiscard]] int pid() const noexcept;  ///< -1 when not running
  [[nodiscard]] const std::string& server_name() const noexcept;  ///< as JetStream reports leaders
  [[nodiscard]] std::filesystem::path log_file() const;           ///< stdout+stderr of all runs

  void start();  ///< (re)start on the same port and store; returns once it accepts connections
  void stop();   ///< SIGTERM and wait (bounded); SIGKILL if it does not exit in 10 s
  void kill();   ///< SIGKILL and wait

 private:
  friend class NatsCluster;
  struct Impl;
  explicit NatsServer(std::unique_ptr<Impl> impl);  // a cluster node, not started yet
  std::unique_ptr<Impl> impl_;
};

/// Three (or n) JetStream nodes on loopback forming one cluster.
class NatsCluster {
 public:
  explicit NatsCluster(int nodes = 3);
  ~NatsCluster();
  NatsCluster(const NatsCluster&) = delete;
  NatsCluster& operator=(const NatsCluster&) = delete;

  [[nodiscard]] std::vector<std::string> urls() const;
  [[nodiscard]] std::string url() const;  ///< all node urls joined with ','
  [[nodiscard]] int size() const noexcept;
  [[nodiscard]] NatsServer& node(int i);  ///< kill()/start() a node to force a leader change
  /// Waits (bounded) until JetStream reports a meta leader.
  void wait_until_ready(std::chrono::seconds timeout = std::chrono::seconds(30));

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class PostgresServer {
 public:
  PostgresServer();   ///< initdb in a temp dir and start; ready when constructed
  ~PostgresServer();  ///< stops the server and removes its directory
  PostgresServer(const PostgresServer&) = delete;
  PostgresServer& operator=(const PostgresServer&) = delete;

  [[nodiscard]] int port() const noexcept;
  [[nodiscard]] int pid() const noexcept;  ///< the postmaster; -1 when not running
  [[nodiscard]] std::filesystem::path log_file() const;
  /// "postgresql://postgres@127.0.0.1:PORT/postgres" (trust auth on loopback).
  [[nodiscard]] std::string url(const std::string& database = "postgres") const;
  /// CREATE DATABASE name (once) and return its url.
  std::string create_database(const std::string& name);
  /// Runs SQL with psql against `database` as a script (statement by statement, stopping at the
  /// first error); returns stdout (tuples only, unaligned, no command tags) without trailing
  /// newlines. Throws std::runtime_error with psql's stderr on error.
  std::string psql(const std::string& sql, const std::string& database = "postgres") const;

  void stop();     ///< fast shutdown, bounded wait
  void start();    ///< start again on the same port and data
  void restart();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Runs a shell command (/bin/sh -c), returns its exit status and captured stdout (and stderr
/// apart). On timeout the command's process group is killed and status is -1.
struct CommandResult {
  int status = -1;  ///< exit code; 128+N when killed by signal N; -1 on timeout
  std::string output;
  std::string error;  ///< stderr
};
CommandResult run_command(const std::string& command, std::chrono::seconds timeout = std::chrono::seconds(120));

}  // namespace natspubsub::testing
