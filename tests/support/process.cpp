#include "support/process.hpp"

#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <csignal>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <future>
#include <iterator>
#include <mutex>
#include <stop_token>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <utility>

namespace natspubsub::testing::detail {
namespace {

using Clock = std::chrono::steady_clock;

class UniqueFd {
 public:
  explicit UniqueFd(int fd = -1) noexcept : fd_(fd) {}
  ~UniqueFd() { reset(); }
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  UniqueFd& operator=(UniqueFd&&) = delete;
  [[nodiscard]] int get() const noexcept { return fd_; }
  void reset() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_;
};

[[noreturn]] void throw_errno(const std::string& what) {
  throw std::system_error(errno, std::generic_category(), what);
}

UniqueFd open_or_throw(const std::string& path, int flags, mode_t mode = 0644) {
  UniqueFd fd(::open(path.c_str(), flags | O_CLOEXEC, mode));
  if (fd.get() < 0) throw_errno("open " + path);
  return fd;
}

// What the child reports through the status pipe when it fails before exec.
struct ChildFailure {
  int step;
  int error;
};

constexpr const char* kStepNames[] = {"setpgid", "dup2", "chdir", "setgroups", "setgid",
                                      "setuid", "prctl(PR_SET_PDEATHSIG)", "parent check", "exec"};
enum ChildStep : int { kSetpgid, kDup, kChdir, kSetgroups, kSetgid, kSetuid, kPdeathsig, kParentGone, kExec };

[[noreturn]] void child_fail(int report_fd, ChildStep step) noexcept {
  const ChildFailure failure{step, errno};
  [[maybe_unused]] const ssize_t written = ::write(report_fd, &failure, sizeof failure);
  ::_exit(127);
}

// fork + exec with the child in its own process group. Everything the child needs is prepared
// before fork: the test process has other threads (cnats), so the child may only make
// async-signal-safe calls until exec.
pid_t spawn_child(const std::vector<std::string>& argv, int in_fd, int out_fd, int err_fd,
                  const std::filesystem::path& working_dir, const std::optional<UserIds>& run_as) {
  if (argv.empty()) throw std::invalid_argument("spawn: empty argv");
  std::vector<char*> args;
  args.reserve(argv.size() + 1);
  for (const auto& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
  args.push_back(nullptr);
  const std::string cwd = working_dir.string();

  // Closed by a successful exec (O_CLOEXEC), so EOF on the read end means the program runs.
  int status_pipe[2];
  if (::pipe2(status_pipe, O_CLOEXEC) != 0) throw_errno("pipe2");
  UniqueFd status_read(status_pipe[0]);
  UniqueFd status_write(status_pipe[1]);

  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) throw_errno("fork");
  if (pid == 0) {
    const int report = status_write.get();
    if (::setpgid(0, 0) != 0) child_fail(report, kSetpgid);
    if (::dup2(in_fd, STDIN_FILENO) < 0 || ::dup2(out_fd, STDOUT_FILENO) < 0 ||
        ::dup2(err_fd, STDERR_FILENO) < 0)
      child_fail(report, kDup);
    // A test's client sockets must not stay open inside a server: closing a connection in the
    // test would otherwise not reach the server. close_range marks everything above stderr
    // close-on-exec (the status pipe included, which must survive until exec).
    if (::close_range(3, ~0U, CLOSE_RANGE_CLOEXEC) != 0) {
      for (int fd = 3; fd < 65536; ++fd) ::fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
    if (!cwd.empty() && ::chdir(cwd.c_str()) != 0) child_fail(report, kChdir);
    if (run_as) {
      const gid_t gid = run_as->gid;
      if (::setgroups(1, &gid) != 0) child_fail(report, kSetgroups);
      if (::setgid(gid) != 0) child_fail(report, kSetgid);
      if (::setuid(run_as->uid) != 0) child_fail(report, kSetuid);
    }
    // After setuid, which clears it. If the test process dies (crash, SIGKILL, timeout) the
    // server dies too instead of holding ports and CPU.
    if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) child_fail(report, kPdeathsig);
    // The parent may have died before prctl took effect; then no signal would ever come.
    if (::getppid() != parent) {
      errno = ESRCH;
      child_fail(report, kParentGone);
    }
    ::execv(args[0], args.data());
    child_fail(report, kExec);
  }

  // Also set from here so a group kill right after spawn cannot miss the child.
  ::setpgid(pid, pid);
  status_write.reset();
  ChildFailure failure{};
  ssize_t n;
  do {
    n = ::read(status_read.get(), &failure, sizeof failure);
  } while (n < 0 && errno == EINTR);
  if (n == static_cast<ssize_t>(sizeof failure)) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    throw std::runtime_error("cannot start " + argv[0] + ": " + kStepNames[failure.step] +
                             " failed: " + std::strerror(failure.error));
  }
  return pid;
}

// PR_SET_PDEATHSIG fires when the *thread* that forked exits, not the process. A test may well
// start or restart a server from a worker thread that ends before the server should; so servers
// are forked from one thread that lives as long as the test process.
class SpawnerThread {
 public:
  static SpawnerThread& instance() {
    static SpawnerThread spawner;
    return spawner;
  }

  pid_t run(std::function<pid_t()> spawn) {
    std::packaged_task<pid_t()> task(std::move(spawn));
    auto result = task.get_future();
    {
      const std::lock_guard lock(mutex_);
      tasks_.push_back(std::move(task));
    }
    wake_.notify_one();
    return result.get();  // rethrows what spawn threw
  }

 private:
  SpawnerThread()
      : thread_([this](std::stop_token stop) {
          std::unique_lock lock(mutex_);
          while (wake_.wait(lock, stop, [this] { return !tasks_.empty(); })) {
            auto task = std::move(tasks_.front());
            tasks_.pop_front();
            lock.unlock();
            task();
            lock.lock();
          }
        }) {}

  std::mutex mutex_;
  std::condition_variable_any wake_;
  std::deque<std::packaged_task<pid_t()>> tasks_;
  std::jthread thread_;  // last: starts after, and is joined before, the members it uses
};

std::string describe_status(int status) {
  if (status == -1) return "not started";
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    const char* name = ::sigabbrev_np(WTERMSIG(status));
    return "killed by signal " + std::to_string(WTERMSIG(status)) + (name ? std::string(" (SIG") + name + ")" : "");
  }
  return "wait status " + std::to_string(status);
}

}  // namespace

ChildProcess::~ChildProcess() { kill_group(); }

void ChildProcess::spawn(const SpawnOptions& options) {
  if (running()) throw std::logic_error("spawn: " + options.argv.at(0) + " is still running");
  UniqueFd in = open_or_throw("/dev/null", O_RDONLY);
  UniqueFd out = options.log_file.empty()
                     ? open_or_throw("/dev/null", O_WRONLY)
                     : open_or_throw(options.log_file.string(), O_WRONLY | O_CREAT | O_APPEND);
  pid_ = SpawnerThread::instance().run([&] {
    return spawn_child(options.argv, in.get(), out.get(), out.get(), options.working_dir, options.run_as);
  });
}

bool ChildProcess::running() noexcept {
  if (pid_ < 0) return false;
  int status = 0;
  const pid_t r = ::waitpid(pid_, &status, WNOHANG);
  if (r == 0) return true;
  if (r == pid_) last_status_ = status;
  pid_ = -1;  // reaped, or not our child any more (ECHILD): either way it is gone
  return false;
}

pid_t ChildProcess::pid() noexcept { return running() ? pid_ : -1; }

void ChildProcess::signal(int sig) noexcept {
  if (running()) ::kill(pid_, sig);
}

bool ChildProcess::wait_exit(std::chrono::milliseconds timeout) noexcept {
  const auto deadline = Clock::now() + timeout;
  while (running()) {
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

void ChildProcess::kill_group() noexcept {
  if (!running()) return;
  // The leader is not reaped yet, so its pid still names our group and cannot have been reused.
  ::kill(-pid_, SIGKILL);
  ::kill(pid_, SIGKILL);
  wait_exit(std::chrono::seconds(10));
}

void ChildProcess::stop(int sig, std::chrono::milliseconds grace) noexcept {
  if (!running()) return;
  ::kill(pid_, sig);
  if (!wait_exit(grace)) kill_group();
}

std::string ChildProcess::last_exit() const { return describe_status(last_status_); }

ProcessResult run_process(const std::vector<std::string>& argv, std::chrono::milliseconds timeout,
                          const std::optional<UserIds>& run_as, const std::filesystem::path& working_dir) {
  const auto deadline = Clock::now() + timeout;
  UniqueFd in = open_or_throw("/dev/null", O_RDONLY);
  int out_pipe[2];
  int err_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0) throw_errno("pipe2");
  UniqueFd out_read(out_pipe[0]);
  UniqueFd out_write(out_pipe[1]);
  if (::pipe2(err_pipe, O_CLOEXEC) != 0) throw_errno("pipe2");
  UniqueFd err_read(err_pipe[0]);
  UniqueFd err_write(err_pipe[1]);

  const pid_t pid = spawn_child(argv, in.get(), out_write.get(), err_write.get(), working_dir, run_as);
  out_write.reset();
  err_write.reset();

  ProcessResult result;
  pollfd fds[2] = {{out_read.get(), POLLIN, 0}, {err_read.get(), POLLIN, 0}};
  std::string* sinks[2] = {&result.out, &result.err};
  char buffer[8192];
  while (fds[0].fd >= 0 || fds[1].fd >= 0) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      result.timed_out = true;
      break;
    }
    const int ready = ::poll(fds, 2, static_cast<int>(left.count()));
    if (ready < 0 && errno != EINTR) break;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      const ssize_t n = ::read(fds[i].fd, buffer, sizeof buffer);
      if (n > 0) {
        sinks[i]->append(buffer, static_cast<std::size_t>(n));
      } else if (n == 0 || errno != EINTR) {
        fds[i].fd = -1;  // EOF; poll ignores negative descriptors
      }
    }
  }

  // Output closed does not mean exited; keep the wait bounded by the same deadline.
  int status = 0;
  for (;;) {
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) break;
    if (r < 0) {
      status = -1;
      break;
    }
    if (result.timed_out || Clock::now() >= deadline) {
      result.timed_out = true;
      ::kill(-pid, SIGKILL);
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (result.timed_out) {
    result.status = -1;
  } else if (status != -1 && WIFEXITED(status)) {
    result.status = WEXITSTATUS(status);
  } else if (status != -1 && WIFSIGNALED(status)) {
    result.status = 128 + WTERMSIG(status);
  }
  return result;
}

std::string file_from(const std::filesystem::path& file, std::uintmax_t offset) {
  std::ifstream in(file, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(offset));
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

bool contains_ignoring_case(std::string text, std::string needle) {
  const auto lower = [](std::string& s) {
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  };
  lower(text);
  lower(needle);
  return text.find(needle) != std::string::npos;
}

std::string file_tail(const std::filesystem::path& file, std::size_t max_bytes) {
  std::ifstream in(file, std::ios::binary);
  if (!in) return {};
  in.seekg(0, std::ios::end);
  const auto size = static_cast<std::size_t>(in.tellg());
  const std::size_t start = size > max_bytes ? size - max_bytes : 0;
  in.seekg(static_cast<std::streamoff>(start));
  std::string tail(size - start, '\0');
  in.read(tail.data(), static_cast<std::streamsize>(tail.size()));
  return tail;
}

}  // namespace natspubsub::testing::detail
