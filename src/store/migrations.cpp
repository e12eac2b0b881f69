#include <natspubsub/store/migrations.hpp>

#include <algorithm>
#include <chrono>
#include <set>

#include <natspubsub/features.hpp>
#include <natspubsub/store/sqlite.hpp>

#if NATSPUBSUB_HAS_POSTGRES
#include <pqxx/transaction>

#include <natspubsub/store/postgres.hpp>

#include "store/postgres_exec.hpp"
#endif

#include "store/embedded_migrations.hpp"
#include "store/logger.hpp"

namespace natspubsub::store {

namespace {

#if NATSPUBSUB_HAS_POSTGRES
// Held (transaction-scoped) by every step of the PostgreSQL runner, so runners in several
// processes take turns; "NPSBMIGR" in ASCII.
constexpr std::int64_t kMigrationLockKey = 0x4e5053424d494752;
#endif

constexpr std::string_view kSqliteMigrationsTable =
    "CREATE TABLE IF NOT EXISTS natspubsub_schema_migrations ("
    " version INTEGER PRIMARY KEY,"
    " name TEXT NOT NULL,"
    " applied_at INTEGER NOT NULL)";  // Unix milliseconds, like every SQLite timestamp of ours

#if NATSPUBSUB_HAS_POSTGRES
constexpr std::string_view kPostgresMigrationsTable =
    "CREATE TABLE IF NOT EXISTS natspubsub_schema_migrations ("
    " version integer PRIMARY KEY,"
    " name text NOT NULL,"
    " applied_at timestamptz NOT NULL DEFAULT now())";
#endif

std::int64_t unix_ms_now() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

void warn_about_unknown(Backend backend, const std::vector<int>& applied) {
  std::set<int> known;
  for (const auto& m : migrations(backend)) known.insert(m.version);
  for (int v : applied) {
    if (!known.contains(v)) {
      detail::logger()->warn(
          "natspubsub: the {} schema has migration {} which this library version does not know "
          "(written by a newer version?)",
          to_string(backend), v);
    }
  }
}

SqliteDatabase& as_sqlite(Database& db) { return dynamic_cast<SqliteDatabase&>(db); }
#if NATSPUBSUB_HAS_POSTGRES
PostgresDatabase& as_postgres(Database& db) { return dynamic_cast<PostgresDatabase&>(db); }
#else
[[noreturn]] void no_postgres() { throw DatabaseError("this build of natspubsub has no PostgreSQL support"); }
#endif

}  // namespace

std::vector<Migration> migrations(Backend backend) {
  std::vector<Migration> out;
  for (const auto& m : detail::embedded_migrations(backend)) out.push_back({m.version, m.name, m.sql});
  std::stable_sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.version < b.version; });
  for (std::size_t i = 1; i < out.size(); ++i) {
    if (out[i].version == out[i - 1].version) {
      throw DatabaseError("two migrations with version " + std::to_string(out[i].version) + ": " +
                          std::string(out[i - 1].name) + " and " + std::string(out[i].name));
    }
  }
  return out;
}

std::vector<int> migrate(SqliteDatabase& db) {
  {
    auto txn = db.begin();
    txn.execute(kSqliteMigrationsTable);
    txn.commit();
  }
  std::vector<int> applied;
  for (const auto& m : migrations(Backend::sqlite)) {
    // BEGIN IMMEDIATE takes the write lock first, so two processes cannot both see the version
    // missing and apply it twice.
    auto txn = db.begin(SqliteTransaction::Mode::immediate);
    if (!txn.query("SELECT 1 FROM natspubsub_schema_migrations WHERE version = $1", {m.version}).empty()) {
      continue;  // rolled back by the destructor: nothing was written
    }
    detail::logger()->info("natspubsub: applying SQLite migration {} to {}", m.name, db.description());
    try {
      txn.execute_script(m.sql);
    } catch (const DatabaseError& e) {
      throw DatabaseError("migration " + std::string(m.name) + " failed: " + e.what(), e.code(), e.query());
    }
    txn.execute("INSERT INTO natspubsub_schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                {m.version, m.name, unix_ms_now()});
    txn.commit();
    applied.push_back(m.version);
  }
  warn_about_unknown(Backend::sqlite, applied_migrations(db));
  return applied;
}

#if NATSPUBSUB_HAS_POSTGRES
std::vector<int> migrate(PostgresDatabase& db) {
  auto& connection = db.connection();
  std::vector<int> applied;
  std::string step = "creating natspubsub_schema_migrations";
  try {
    {
      pqxx::work txn(connection);
      // CREATE TABLE IF NOT EXISTS is not safe against itself run concurrently (both may pass
      // the check and one fails on the catalog's unique index): the lock comes first.
      txn.exec_params("SELECT pg_advisory_xact_lock($1)", kMigrationLockKey);
      txn.exec(std::string(kPostgresMigrationsTable));
      txn.commit();
    }
    for (const auto& m : migrations(Backend::postgres)) {
      step = "applying migration " + std::string(m.name);
      pqxx::work txn(connection);
      txn.exec_params("SELECT pg_advisory_xact_lock($1)", kMigrationLockKey);
      // Checked under the lock: a runner that waited sees what the other one committed.
      if (!txn.exec_params("SELECT 1 FROM natspubsub_schema_migrations WHERE version = $1", m.version).empty()) {
        txn.commit();
        continue;
      }
      detail::logger()->info("natspubsub: applying PostgreSQL migration {} to {}", m.name, db.description());
      txn.exec(std::string(m.sql));
      txn.exec_params("INSERT INTO natspubsub_schema_migrations (version, name) VALUES ($1, $2)", m.version,
                      std::string(m.name));
      txn.commit();
      applied.push_back(m.version);
    }
  } catch (...) {
    rethrow_postgres_error(step, &db.url());
  }
  warn_about_unknown(Backend::postgres, applied_migrations(db));
  return applied;
}
#endif

std::vector<int> migrate(Database& db) {
#if NATSPUBSUB_HAS_POSTGRES
  return db.backend() == Backend::sqlite ? migrate(as_sqlite(db)) : migrate(as_postgres(db));
#else
  if (db.backend() != Backend::sqlite) no_postgres();
  return migrate(as_sqlite(db));
#endif
}

std::vector<int> applied_migrations(SqliteDatabase& db) {
  std::vector<int> out;
  if (db.query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'natspubsub_schema_migrations'").empty()) {
    return out;
  }
  for (const auto& row : db.query("SELECT version FROM natspubsub_schema_migrations ORDER BY version")) {
    out.push_back(static_cast<int>(row.as_int(0)));
  }
  return out;
}

#if NATSPUBSUB_HAS_POSTGRES
std::vector<int> applied_migrations(PostgresDatabase& db) {
  std::vector<int> out;
  auto exists = db.query("SELECT to_regclass('natspubsub_schema_migrations') IS NOT NULL");
  if (exists.empty() || exists.front().as_text(0) != "t") return out;
  for (const auto& row : db.query("SELECT version FROM natspubsub_schema_migrations ORDER BY version")) {
    out.push_back(static_cast<int>(row.as_int(0)));
  }
  return out;
}

#endif

std::vector<int> applied_migrations(Database& db) {
#if NATSPUBSUB_HAS_POSTGRES
  return db.backend() == Backend::sqlite ? applied_migrations(as_sqlite(db)) : applied_migrations(as_postgres(db));
#else
  if (db.backend() != Backend::sqlite) no_postgres();
  return applied_migrations(as_sqlite(db));
#endif
}

}  // namespace natspubsub::store
