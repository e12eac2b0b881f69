#pragma once
// Shared pieces of the fault tests (tests/fault_*_test.cpp): bounded waits, a reproducible random
// source, a relay process that can be SIGKILLed, and the lost/duplicated arithmetic every fault
// test prints and asserts on.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include <natspubsub/envelope.hpp>
#include <natspubsub/outbox.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/store/database.hpp>

#include "support/eventually.hpp"

namespace natspubsub::testing {

/// One statement in its own transaction (the Database interface only offers in_transaction).
inline std::vector<store::Row> query(store::Database& db, std::string_view sql, const store::Params& params = {}) {
  std::vector<store::Row> rows;
  db.in_transaction([&](store::Transaction& tx) { rows = tx.query(sql, params); });
  return rows;
}
inline int64_t execute(store::Database& db, std::string_view sql, const store::Params& params = {}) {
  int64_t n = 0;
  db.in_transaction([&](store::Transaction& tx) { n = tx.execute(sql, params); });
  return n;
}

/// A random source whose seed is printed, and can be forced with NATSPUBSUB_FAULT_SEED, so that
/// a failing run of "kill at random points" can be replayed with the same points.
inline std::mt19937_64 fault_random(const std::string& what) {
  uint64_t seed = std::random_device{}();
  if (const char* s = std::getenv("NATSPUBSUB_FAULT_SEED"); s != nullptr && *s != '\0') seed = std::strtoull(s, nullptr, 10);
  MESSAGE(what << ": seed " << seed << " (rerun with NATSPUBSUB_FAULT_SEED=" << seed << ")");
  return std::mt19937_64(seed);
}

/// Lost and duplicated events of a run: `expected` ids against `seen` (one entry per copy seen,
/// in a stream or in a database table).
struct Tally {
  size_t expected = 0;
  size_t seen = 0;
  size_t distinct = 0;
  size_t lost = 0;        ///< expected, never seen
  size_t duplicated = 0;  ///< extra copies of an id
  size_t unexpected = 0;  ///< seen, never expected
};

inline Tally tally(const std::vector<std::string>& expected, const std::vector<std::string>& seen) {
  Tally t;
  t.expected = expected.size();
  t.seen = seen.size();
  std::map<std::string, size_t> copies;
  for (const auto& id : seen) copies[id]++;
  t.distinct = copies.size();
  std::set<std::string> wanted(expected.begin(), expected.end());
  for (const auto& id : wanted) t.lost += copies.count(id) ? 0 : 1;
  for (const auto& [id, n] : copies) {
    t.duplicated += n - 1;
    t.unexpected += wanted.count(id) ? 0 : 1;
  }
  return t;
}

/// Publishes `events` on its own thread in chunks, each retried with the same event ids until all
/// are acknowledged (bounded), as a producer that cares about its events does. Chunks keep
/// publishing going on long enough for a fault to land in the middle of it.
class ChunkedProducer {
 public:
  ChunkedProducer(Publisher& publisher, std::vector<OutgoingEvent> events, size_t chunk = 250,
                  std::chrono::milliseconds pause = std::chrono::milliseconds(100))
      : events_(std::move(events)), chunk_(chunk), pause_(pause) {
    thread_ = std::jthread([this, &publisher] { run(publisher); });
  }
  void join() { thread_.join(); }
  [[nodiscard]] size_t published() const { return published_; }       ///< acknowledged so far
  [[nodiscard]] size_t first_failures() const { return first_failures_; }  ///< failed on the first try
  [[nodiscard]] size_t retries() const { return retries_; }           ///< messages sent again
  [[nodiscard]] size_t never_acknowledged() const { return never_acknowledged_; }

 private:
  void run(Publisher& publisher) {
    BatchOptions bo;
    bo.window = 64;
    bo.ack_timeout = std::chrono::seconds(2);
    for (size_t from = 0; from < events_.size(); from += chunk_) {
      std::vector<OutgoingEvent> chunk(events_.begin() + static_cast<long>(from),
                                       events_.begin() + static_cast<long>(std::min(events_.size(), from + chunk_)));
      auto results = publisher.publish_batch(chunk, bo);
      for (const auto& r : results) first_failures_ += r ? 0 : 1;
      for (int round = 0; round < 40; ++round) {
        std::vector<size_t> failed;
        for (size_t i = 0; i < results.size(); ++i)
          if (!results[i]) failed.push_back(i);
        if (failed.empty()) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(300));
        std::vector<OutgoingEvent> retry;
        for (auto i : failed) retry.push_back(chunk[i]);
        retries_ += retry.size();
        auto again = publisher.publish_batch(retry, bo);
        for (size_t k = 0; k < failed.size(); ++k) results[failed[k]] = again[k];
      }
      for (const auto& r : results) (r ? published_ : never_acknowledged_) += 1;
      std::this_thread::sleep_for(pause_);
    }
  }

  std::vector<OutgoingEvent> events_;
  size_t chunk_;
  std::chrono::milliseconds pause_;
  std::atomic<size_t> published_{0};
  std::atomic<size_t> first_failures_{0};
  std::atomic<size_t> retries_{0};
  std::atomic<size_t> never_acknowledged_{0};
  std::jthread thread_;
};

/// Events written under `keys` partition keys, interleaved as many producers would write them:
/// event i has key "order-(i % keys)" and is the (i / keys)-th event of its key.
struct KeyedEvents {
  struct Place {
    int key = 0;
    int index = 0;  ///< position among its key's events
  };
  std::vector<std::string> ids;        ///< in enqueue order
  std::map<std::string, Place> place;  ///< event id -> its key and position

  /// Enqueues `n` order events to `subject` in one transaction of `db`.
  static KeyedEvents enqueue(store::Database& db, const std::string& subject, int n, int keys) {
    KeyedEvents events;
    db.in_transaction([&](store::Transaction& tx) {
      for (int i = 0; i < n; ++i) {
        auto e = Envelope::make("order.created", "orders", {{"i", i}});
        natspubsub::enqueue(tx, subject, e, "order-" + std::to_string(i % keys));
        events.ids.push_back(e.event_id);
        events.place[e.event_id] = {i % keys, i / keys};
      }
    });
    return events;
  }

  /// How many of `msg_ids` (in stream order) were stored after a later event of their key.
  [[nodiscard]] std::size_t out_of_key_order(const std::vector<std::string>& msg_ids) const {
    std::map<int, int> last;  // key -> highest position stored so far
    std::size_t out_of_order = 0;
    for (const auto& id : msg_ids) {
      auto it = place.find(id);
      if (it == place.end()) continue;
      auto [seen, fresh] = last.try_emplace(it->second.key, it->second.index);
      if (fresh) continue;
      if (it->second.index < seen->second) ++out_of_order;
      seen->second = std::max(seen->second, it->second.index);
    }
    return out_of_order;
  }
};

/// A natspubsub-relay process (the real worker binary), killed with SIGKILL by the test.
class RelayProcess {
 public:
  RelayProcess(std::vector<std::string> args, const std::filesystem::path& log) {
    args.insert(args.begin(), binary());
    pid_ = fork();
    if (pid_ == 0) {
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
      }
      execv(argv[0], argv.data());
      _exit(127);
    }
    REQUIRE(pid_ > 0);
  }
  ~RelayProcess() {
    if (pid_ > 0) kill_now();
  }
  RelayProcess(const RelayProcess&) = delete;
  RelayProcess& operator=(const RelayProcess&) = delete;

  static std::string binary() { return NATSPUBSUB_BINARY_DIR "/workers/natspubsub-relay"; }

  /// SIGKILL and reap.
  void kill_now() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  /// Waits (bounded) for a --once run to end; returns its exit code, or -1 if it had to be killed.
  int wait(std::chrono::milliseconds limit) {
    auto deadline = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < deadline) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    kill_now();
    return -1;
  }
  /// True while the process has not exited (reaps it if it has).
  bool alive() {
    if (pid_ <= 0) return false;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return false;
    }
    return true;
  }

 private:
  pid_t pid_ = -1;
};

}  // namespace natspubsub::testing
