// PostgresServer: a throwaway PostgreSQL cluster (initdb + the postgres binary run directly, so
// the fixture owns the postmaster's pid) in a temporary directory on a free loopback port.
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <csignal>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <set>
#include <stdexcept>
#include <system_error>
#include <thread>

#include "support/process.hpp"
#include "support/servers.hpp"

namespace natspubsub::testing {
namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

constexpr auto kReadyTimeout = std::chrono::seconds(30);
constexpr auto kStopGrace = std::chrono::seconds(15);

bool has_server_binaries(const fs::path& dir) {
  for (const char* tool : {"postgres", "initdb", "pg_isready", "psql"})
    if (::access((dir / tool).c_str(), X_OK) != 0) return false;
  return true;
}

// Debian keeps the server binaries (initdb, postgres) out of PATH, in a versioned directory;
// /usr/bin only has wrappers for the client tools. The project targets 15, so prefer it.
const fs::path& postgres_bin_dir() {
  static const fs::path dir = [] {
    const fs::path preferred = "/usr/lib/postgresql/15/bin";
    if (has_server_binaries(preferred)) return preferred;
    std::vector<std::pair<int, fs::path>> installed;
    std::error_code error;
    for (const auto& entry : fs::directory_iterator("/usr/lib/postgresql", error)) {
      const auto version = entry.path().filename().string();
      if (!version.empty() && std::all_of(version.begin(), version.end(), [](unsigned char c) { return std::isdigit(c) != 0; }) &&
          has_server_binaries(entry.path() / "bin"))
        installed.emplace_back(std::stoi(version), entry.path() / "bin");
    }
    if (!installed.empty()) return std::max_element(installed.begin(), installed.end())->second;
    const auto pg_config = detail::run_process({"/bin/sh", "-c", "pg_config --bindir"}, std::chrono::seconds(10));
    fs::path reported = pg_config.out.substr(0, pg_config.out.find('\n'));
    if (pg_config.status == 0 && has_server_binaries(reported)) return reported;
    throw std::runtime_error(
        "PostgreSQL server binaries (postgres, initdb) not found in /usr/lib/postgresql/*/bin nor "
        "`pg_config --bindir` (apt install postgresql-15)");
  }();
  return dir;
}

// PostgreSQL refuses to run as root, so as root both initdb and postgres run as the `postgres`
// user that the Debian package creates.
std::optional<detail::UserIds> server_user() {
  if (::geteuid() != 0) return std::nullopt;
  const passwd* user = ::getpwnam("postgres");
  if (user == nullptr)
    throw std::runtime_error("PostgresServer: running as root but there is no `postgres` user to run the server as");
  return detail::UserIds{user->pw_uid, user->pw_gid};
}

// Approximates the kernel's check (ignores supplementary groups and ACLs), good enough to steer
// away from e.g. TMPDIR=/root/tmp.
bool traversable_by(const fs::path& dir, const detail::UserIds& ids) {
  std::error_code error;
  fs::path current = fs::absolute(dir, error);
  if (error) return false;
  for (;;) {
    struct stat info {};
    if (::stat(current.c_str(), &info) != 0) return false;
    const mode_t bit = info.st_uid == ids.uid ? S_IXUSR : info.st_gid == ids.gid ? S_IXGRP : S_IXOTH;
    if ((info.st_mode & bit) == 0) return false;
    if (current == current.root_path()) return true;
    current = current.parent_path();
  }
}

fs::path temp_parent(const std::optional<detail::UserIds>& ids) {
  const fs::path preferred = fs::temp_directory_path();
  if (!ids || traversable_by(preferred, *ids)) return preferred;
  if (traversable_by("/tmp", *ids)) return "/tmp";
  throw std::runtime_error("PostgresServer: neither " + preferred.string() +
                           " nor /tmp can be traversed by the postgres user");
}

void give_to(const fs::path& path, const std::optional<detail::UserIds>& ids) {
  if (ids && ::chown(path.c_str(), ids->uid, ids->gid) != 0)
    throw std::system_error(errno, std::generic_category(), "chown " + path.string());
}

std::string quote_identifier(const std::string& name) {
  std::string out = "\"";
  for (const char c : name) {
    if (c == '"') out += '"';
    out += c;
  }
  return out + '"';
}

}  // namespace

struct PostgresServer::Impl {
  const fs::path bin = postgres_bin_dir();
  const std::optional<detail::UserIds> run_as = server_user();
  TempDir dir{"natspubsub-pg", temp_parent(run_as)};
  const fs::path data = dir.path() / "data";
  const fs::path sockets = dir.path() / "sockets";
  const fs::path log = dir.path() / "postgres.log";
  int port = free_port();
  std::uintmax_t log_offset = 0;
  std::set<std::string> databases;
  mutable std::atomic<unsigned> script_counter{0};
  detail::ChildProcess process;  // after `dir`, and stopped in ~Impl before `dir` goes

  Impl() {
    give_to(dir.path(), run_as);
    fs::create_directory(sockets);
    give_to(sockets, run_as);
    const auto result = detail::run_process(
        {(bin / "initdb").string(), "-D", data.string(), "-A", "trust", "-U", "postgres", "-E", "UTF8",
         "--locale=C", "--no-sync"},
        std::chrono::seconds(120), run_as, dir.path());
    if (result.status != 0)
      throw std::runtime_error("initdb failed (status " + std::to_string(result.status) + "):\n" + result.out +
                               result.err);
  }

  // Fast shutdown rather than SIGKILL: a killed postmaster leaves its shared memory behind.
  ~Impl() { process.stop(SIGINT, kStopGrace); }
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;

  void launch() {
    std::error_code ignored;
    const auto size = fs::file_size(log, ignored);
    log_offset = ignored ? 0 : size;
    // fsync and friends off: the cluster is thrown away, and tests restart it often.
    // NATSPUBSUB_TEST_PG_DURABLE=1 turns them on (the benchmark's durable figures).
    const char* durable_env = std::getenv("NATSPUBSUB_TEST_PG_DURABLE");
    const std::string flush = durable_env != nullptr && std::string(durable_env) == "1" ? "on" : "off";
    process.spawn({{(bin / "postgres").string(), "-D", data.string(), "-p", std::to_string(port), "-k",
                    sockets.string(), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=" + flush, "-c",
                    "synchronous_commit=" + flush, "-c", "full_page_writes=" + flush},
                   log,
                   dir.path(),
                   run_as});
  }

  void wait_ready(Clock::time_point deadline) {
    for (;;) {
      if (!process.running())
        throw std::runtime_error(failure("postgres " + process.last_exit() + " while starting"));
      const auto probe =
          detail::run_process({(bin / "pg_isready").string(), "-q", "-h", "127.0.0.1", "-p", std::to_string(port),
                               "-U", "postgres", "-d", "postgres", "-t", "1"},
                              std::chrono::seconds(5));
      if (probe.status == 0) return;
      if (Clock::now() >= deadline) {
        process.stop(SIGQUIT, std::chrono::seconds(5));
        throw std::runtime_error(failure("postgres not accepting connections within " +
                                         std::to_string(kReadyTimeout.count()) + " s"));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }

  void start() {
    if (process.running()) return;
    launch();
    wait_ready(Clock::now() + kReadyTimeout);
  }

  [[nodiscard]] bool port_conflict() const {
    return detail::contains_ignoring_case(detail::file_from(log, log_offset), "address already in use");
  }

  [[nodiscard]] std::string failure(const std::string& what) const {
    return what + " (port " + std::to_string(port) + ", data " + data.string() + ")\n--- tail of " +
           log.string() + " ---\n" + detail::file_tail(log);
  }
};

PostgresServer::PostgresServer() : impl_(std::make_unique<Impl>()) {
  for (int attempt = 1;; ++attempt) {
    try {
      impl_->start();
      return;
    } catch (const std::exception&) {
      // Another process can take the port between free_port() and the postmaster's bind.
      if (attempt >= 3 || !impl_->port_conflict()) throw;
      impl_->port = free_port();
    }
  }
}

PostgresServer::~PostgresServer() = default;

int PostgresServer::port() const noexcept { return impl_->port; }
int PostgresServer::pid() const noexcept { return impl_->process.pid(); }
std::filesystem::path PostgresServer::log_file() const { return impl_->log; }

std::string PostgresServer::url(const std::string& database) const {
  return "postgresql://postgres@127.0.0.1:" + std::to_string(impl_->port) + "/" + database;
}

std::string PostgresServer::create_database(const std::string& name) {
  if (!impl_->databases.contains(name)) {
    psql("CREATE DATABASE " + quote_identifier(name));
    impl_->databases.insert(name);
  }
  return url(name);
}

std::string PostgresServer::psql(const std::string& sql, const std::string& database) const {
  // From a file rather than -c: statements then run one by one like a migration script, and
  // CREATE DATABASE or VACUUM work next to others. psql itself runs as us, over TCP.
  const fs::path script = impl_->dir.path() / ("script-" + std::to_string(++impl_->script_counter) + ".sql");
  {
    std::ofstream out(script, std::ios::trunc);
    out << sql << "\n";
    if (!out.flush()) throw std::runtime_error("cannot write " + script.string());
  }
  const auto result = detail::run_process(
      {(impl_->bin / "psql").string(), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p",
       std::to_string(impl_->port), "-U", "postgres", "-d", database, "-f", script.string()},
      std::chrono::seconds(60));
  std::error_code ignored;
  fs::remove(script, ignored);
  if (result.status != 0) {
    throw std::runtime_error("psql on database " + database + " " +
                             (result.timed_out ? std::string("timed out") : "failed with status " +
                                                                                std::to_string(result.status)) +
                             ":\n" + sql + "\n" + result.err);
  }
  std::string output = result.out;
  while (!output.empty() && output.back() == '\n') output.pop_back();
  return output;
}

void PostgresServer::stop() { impl_->process.stop(SIGINT, kStopGrace); }
void PostgresServer::start() { impl_->start(); }

void PostgresServer::restart() {
  stop();
  start();
}

}  // namespace natspubsub::testing
