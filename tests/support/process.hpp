#pragma once
// Child processes for the server fixtures: fork/exec into its own process group, bounded waits,
// and an orphan guard, so a crashed or failed test never leaves a server behind.
// Internal to tests/support; tests use servers.hpp.
#include <sys/types.h>

#include <chrono>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace natspubsub::testing::detail {

/// The system user a child switches to before exec (PostgreSQL refuses to run as root).
struct UserIds {
  uid_t uid = 0;
  gid_t gid = 0;
};

struct SpawnOptions {
  std::vector<std::string> argv;          ///< argv[0] is the path of the executable
  std::filesystem::path log_file;         ///< stdout and stderr are appended here; empty: /dev/null
  std::filesystem::path working_dir;      ///< empty: inherit ours
  std::optional<UserIds> run_as;
};

/// One long-running child (a server). Not copyable; the destructor SIGKILLs its process group.
class ChildProcess {
 public:
  ChildProcess() = default;
  ~ChildProcess();
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  /// Starts the child; throws if one is still running or exec fails.
  void spawn(const SpawnOptions& options);
  /// Reaps the child if it has exited, so a crash is noticed.
  [[nodiscard]] bool running() noexcept;
  /// The pid, or -1 when no child is running.
  [[nodiscard]] pid_t pid() noexcept;
  /// Signals the child only (not its group): servers shut their own helpers down.
  void signal(int sig) noexcept;
  /// True once the child has exited and been reaped within the timeout.
  bool wait_exit(std::chrono::milliseconds timeout) noexcept;
  /// SIGKILL to the whole group, then reap (bounded).
  void kill_group() noexcept;
  /// Graceful stop: `sig` to the child, wait up to `grace`, then kill_group().
  void stop(int sig, std::chrono::milliseconds grace) noexcept;
  /// "exited with status N" / "killed by signal N" for the last child reaped.
  [[nodiscard]] std::string last_exit() const;

 private:
  pid_t pid_ = -1;
  int last_status_ = -1;
};

struct ProcessResult {
  int status = -1;  ///< exit code; 128+signal when killed; -1 on timeout
  bool timed_out = false;
  std::string out;
  std::string err;
};

/// Runs argv to completion with stdin from /dev/null, capturing stdout and stderr. On timeout the
/// whole process group is killed.
ProcessResult run_process(const std::vector<std::string>& argv, std::chrono::milliseconds timeout,
                          const std::optional<UserIds>& run_as = std::nullopt,
                          const std::filesystem::path& working_dir = {});

/// A file's content from byte `offset` on (what a server logged in its current run).
std::string file_from(const std::filesystem::path& file, std::uintmax_t offset);

bool contains_ignoring_case(std::string text, std::string needle);

/// The last `max_bytes` of a file (server logs in failure messages); empty if unreadable.
std::string file_tail(const std::filesystem::path& file, std::size_t max_bytes = 4000);

}  // namespace natspubsub::testing::detail
