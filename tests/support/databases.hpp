#pragma once
// Databases for the store, outbox and inbox tests: one PostgreSQL server per test program
// (started on first use, stopped at exit), a fresh database per test, SQLite files in a TempDir.
//
//   auto url = natspubsub::testing::fresh_postgres_database("outbox");
//   natspubsub::testing::TempDir dir;
//   auto path = natspubsub::testing::sqlite_file(dir);
#include <atomic>
#include <exception>
#include <functional>
#include <latch>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "support/servers.hpp"

namespace natspubsub::testing {

/// Starting PostgreSQL takes seconds: the test cases of one program share a server.
inline PostgresServer& shared_postgres() {
  static PostgresServer server;
  return server;
}

/// A new, empty database on the shared server; returns its URL.
inline std::string fresh_postgres_database(const std::string& prefix) {
  static std::atomic<int> counter{0};
  return shared_postgres().create_database(prefix + "_" + std::to_string(++counter));
}

inline std::string sqlite_file(const TempDir& dir, const std::string& name = "test.db") {
  return (dir.path() / name).string();
}

/// Runs fn(i) for i in [0, n) on n threads released at the same moment, joins them all, then
/// rethrows the first exception any of them threw.
inline void run_concurrently(int n, const std::function<void(int)>& fn) {
  std::latch start(n);
  std::mutex mutex;
  std::exception_ptr first_error;
  {
    std::vector<std::jthread> threads;
    for (int i = 0; i < n; ++i) {
      threads.emplace_back([&, i] {
        start.arrive_and_wait();
        try {
          fn(i);
        } catch (...) {
          std::lock_guard lock(mutex);
          if (!first_error) first_error = std::current_exception();
        }
      });
    }
  }
  if (first_error) std::rethrow_exception(first_error);
}

}  // namespace natspubsub::testing
