#include <natspubsub/store/sqlite.hpp>

#include <sqlite3.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <string>
#include <thread>

#include "store/logger.hpp"

namespace natspubsub::store {

namespace {

std::string code_name(int rc) {
  switch (rc) {
    case SQLITE_CONSTRAINT_UNIQUE: return "SQLITE_CONSTRAINT_UNIQUE";
    case SQLITE_CONSTRAINT_PRIMARYKEY: return "SQLITE_CONSTRAINT_PRIMARYKEY";
    case SQLITE_CONSTRAINT_NOTNULL: return "SQLITE_CONSTRAINT_NOTNULL";
    case SQLITE_CONSTRAINT_CHECK: return "SQLITE_CONSTRAINT_CHECK";
    case SQLITE_CONSTRAINT_FOREIGNKEY: return "SQLITE_CONSTRAINT_FOREIGNKEY";
    case SQLITE_BUSY_SNAPSHOT: return "SQLITE_BUSY_SNAPSHOT";
    case SQLITE_BUSY_RECOVERY: return "SQLITE_BUSY_RECOVERY";
    default: break;
  }
  switch (rc & 0xff) {
    case SQLITE_ERROR: return "SQLITE_ERROR";
    case SQLITE_PERM: return "SQLITE_PERM";
    case SQLITE_ABORT: return "SQLITE_ABORT";
    case SQLITE_BUSY: return "SQLITE_BUSY";
    case SQLITE_LOCKED: return "SQLITE_LOCKED";
    case SQLITE_NOMEM: return "SQLITE_NOMEM";
    case SQLITE_READONLY: return "SQLITE_READONLY";
    case SQLITE_INTERRUPT: return "SQLITE_INTERRUPT";
    case SQLITE_IOERR: return "SQLITE_IOERR";
    case SQLITE_CORRUPT: return "SQLITE_CORRUPT";
    case SQLITE_FULL: return "SQLITE_FULL";
    case SQLITE_CANTOPEN: return "SQLITE_CANTOPEN";
    case SQLITE_CONSTRAINT: return "SQLITE_CONSTRAINT";
    case SQLITE_MISMATCH: return "SQLITE_MISMATCH";
    case SQLITE_MISUSE: return "SQLITE_MISUSE";
    case SQLITE_RANGE: return "SQLITE_RANGE";
    case SQLITE_NOTADB: return "SQLITE_NOTADB";
    default: return "SQLITE_" + std::to_string(rc);
  }
}

/// Every SQLite failure goes through here: busy/locked -> retryable, unique -> unique violation.
[[noreturn]] void throw_sqlite(sqlite3* db, int rc, std::string_view sql, std::string_view what = {}) {
  std::string message = db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
  if (!what.empty()) message = std::string(what) + ": " + message;
  // The statement travels in DatabaseError::query(), not in the message: error lines stay one
  // line, and whoever logs the error decides whether SQL is worth a (debug) line.
  std::string query(sql);
  auto name = code_name(rc);
  int primary = rc & 0xff;
  if (primary == SQLITE_BUSY || primary == SQLITE_LOCKED) {
    throw RetryableDatabaseError(message + " (database is locked by another connection)", name, query);
  }
  if (rc == SQLITE_CONSTRAINT_UNIQUE || rc == SQLITE_CONSTRAINT_PRIMARYKEY) {
    throw UniqueViolationError(message, name, query);
  }
  throw DatabaseError(message, name, query);
}

bool only_space_or_semicolons(const char* tail) {
  for (; tail != nullptr && *tail != '\0'; ++tail) {
    if (!std::isspace(static_cast<unsigned char>(*tail)) && *tail != ';') return false;
  }
  return true;
}

// Which argument a statement parameter takes: `$N` and `?N` by number, a plain `?` by position.
std::size_t argument_index(sqlite3_stmt* stmt, int parameter, std::string_view sql) {
  const char* name = sqlite3_bind_parameter_name(stmt, parameter);
  if (name == nullptr) return static_cast<std::size_t>(parameter - 1);
  std::string_view n(name);
  if (n.size() >= 2 && (n[0] == '$' || n[0] == '?') &&
      std::all_of(n.begin() + 1, n.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); })) {
    auto number = std::stoul(std::string(n.substr(1)));
    if (number >= 1) return number - 1;
  }
  throw DatabaseError("unsupported SQL parameter '" + std::string(n) + "': use $1, $2, ... or ?", "", std::string(sql));
}

/// Resets a cached statement on every way out, so it holds no read lock and no bound values.
class StatementUse {
 public:
  explicit StatementUse(sqlite3_stmt* stmt) noexcept : stmt_(stmt) {}
  ~StatementUse() {
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }
  StatementUse(const StatementUse&) = delete;
  StatementUse& operator=(const StatementUse&) = delete;

 private:
  sqlite3_stmt* stmt_;
};

}  // namespace

void SqliteDatabase::CloseDb::operator()(sqlite3* db) const noexcept { sqlite3_close_v2(db); }
void SqliteDatabase::FinalizeStmt::operator()(sqlite3_stmt* stmt) const noexcept { sqlite3_finalize(stmt); }

SqliteDatabase::SqliteDatabase(const std::string& path, Options options)
    : path_(path), description_("sqlite://" + path) {
  sqlite3* raw = nullptr;
  int rc = sqlite3_open_v2(path.c_str(), &raw, SQLITE_OPEN_READWRITE | (options.create ? SQLITE_OPEN_CREATE : 0),
                           nullptr);
  db_.reset(raw);  // a failed open may still return a handle that must be closed
  if (rc != SQLITE_OK && !options.create && !std::filesystem::exists(path)) {
    throw DatabaseError("SQLite database '" + path + "' does not exist");
  }
  if (rc != SQLITE_OK) throw_sqlite(raw, rc, "", "cannot open SQLite database '" + path + "'");
  sqlite3_extended_result_codes(raw, 1);
  sqlite3_busy_timeout(raw, static_cast<int>(options.busy_timeout.count()));
  // WAL: readers never block the writer and the writer never blocks readers, and a commit is
  // one append. The setting is stored in the file, so every connection gets it.
  // Switching needs an exclusive lock, and SQLite does not call the busy handler for it: when
  // several processes open a new file at once, retry within the busy timeout ourselves.
  auto deadline = std::chrono::steady_clock::now() + options.busy_timeout;
  std::vector<Row> mode;
  for (;;) {
    try {
      mode = query("PRAGMA journal_mode");
      if (mode.empty() || mode.front().as_text(0) != "wal") mode = query("PRAGMA journal_mode=WAL");
      break;
    } catch (const RetryableDatabaseError&) {
      if (std::chrono::steady_clock::now() >= deadline) throw;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  if (mode.empty() || mode.front().as_text(0) != "wal") {
    detail::logger()->warn("natspubsub: SQLite database '{}' is not in WAL mode (journal_mode={})", path,
                           mode.empty() ? std::string("?") : mode.front().as_text(0));
  }
  exec_simple("PRAGMA foreign_keys=ON");
}

SqliteDatabase::~SqliteDatabase() {
  // An open SqliteTransaction must not outlive its database; statements go before the handle.
  statements_.clear();
}

SqliteTransaction SqliteDatabase::begin(SqliteTransaction::Mode mode) { return SqliteTransaction(*this, mode); }

std::int64_t SqliteDatabase::execute(std::string_view sql, const Params& params) {
  return run(sql, params, nullptr);
}

std::vector<Row> SqliteDatabase::query(std::string_view sql, const Params& params) {
  std::vector<Row> rows;
  run(sql, params, &rows);
  return rows;
}

void SqliteDatabase::in_transaction(const std::function<void(Transaction&)>& fn) {
  auto txn = begin();
  Transaction handle(txn);
  fn(handle);
  txn.commit();
}

sqlite3_stmt* SqliteDatabase::prepare(std::string_view sql) {
  std::string key(sql);
  if (auto it = statements_.find(key); it != statements_.end()) return it->second.get();
  constexpr std::size_t kMaxCachedStatements = 128;
  if (statements_.size() >= kMaxCachedStatements) statements_.clear();  // callers building SQL text
  sqlite3_stmt* raw = nullptr;
  const char* tail = nullptr;
  int rc = sqlite3_prepare_v3(db_.get(), key.c_str(), static_cast<int>(key.size() + 1), SQLITE_PREPARE_PERSISTENT,
                              &raw, &tail);
  StmtPtr stmt(raw);
  if (rc != SQLITE_OK) throw_sqlite(db_.get(), rc, sql);
  if (!stmt) throw DatabaseError("empty SQL statement", "", key);
  if (!only_space_or_semicolons(tail)) {
    throw DatabaseError("one statement at a time (use execute_script for several)", "", key);
  }
  auto* result = stmt.get();
  statements_.emplace(std::move(key), std::move(stmt));
  return result;
}

std::int64_t SqliteDatabase::run(std::string_view sql, const Params& params, std::vector<Row>* rows) {
  sqlite3_stmt* stmt = prepare(sql);
  StatementUse use(stmt);
  int count = sqlite3_bind_parameter_count(stmt);
  std::size_t needed = 0;
  for (int i = 1; i <= count; ++i) {
    auto index = argument_index(stmt, i, sql);
    needed = std::max(needed, index + 1);
    if (index >= params.size()) {
      throw DatabaseError("the statement needs parameter $" + std::to_string(index + 1) + " but got " +
                              std::to_string(params.size()),
                          "", std::string(sql));
    }
    const Value& v = params[index];
    int rc = SQLITE_OK;
    if (v.is_null()) {
      rc = sqlite3_bind_null(stmt, i);
    } else if (v.is_int()) {
      rc = sqlite3_bind_int64(stmt, i, v.as_int());
    } else if (v.is_real()) {
      rc = sqlite3_bind_double(stmt, i, v.as_real());
    } else {
      auto text = v.as_text();
      rc = sqlite3_bind_text64(stmt, i, text.data(), text.size(), SQLITE_TRANSIENT, SQLITE_UTF8);
    }
    if (rc != SQLITE_OK) throw_sqlite(db_.get(), rc, sql);
  }
  if (needed != params.size()) {
    throw DatabaseError("the statement uses " + std::to_string(needed) + " parameters but got " +
                            std::to_string(params.size()),
                        "", std::string(sql));
  }
  for (;;) {
    int rc = sqlite3_step(stmt);
    if (rc == SQLITE_DONE) break;
    if (rc != SQLITE_ROW) throw_sqlite(db_.get(), rc, sql);
    if (rows == nullptr) continue;
    int columns = sqlite3_column_count(stmt);
    std::vector<Value> values;
    values.reserve(static_cast<std::size_t>(columns));
    for (int c = 0; c < columns; ++c) {
      switch (sqlite3_column_type(stmt, c)) {
        case SQLITE_NULL: values.emplace_back(); break;
        case SQLITE_INTEGER: values.emplace_back(static_cast<std::int64_t>(sqlite3_column_int64(stmt, c))); break;
        case SQLITE_FLOAT: values.emplace_back(sqlite3_column_double(stmt, c)); break;
        case SQLITE_BLOB: {
          const auto* data = static_cast<const char*>(sqlite3_column_blob(stmt, c));
          values.emplace_back(std::string(data == nullptr ? "" : data, static_cast<std::size_t>(sqlite3_column_bytes(stmt, c))));
          break;
        }
        default: {
          const auto* data = reinterpret_cast<const char*>(sqlite3_column_text(stmt, c));
          values.emplace_back(std::string(data == nullptr ? "" : data, static_cast<std::size_t>(sqlite3_column_bytes(stmt, c))));
          break;
        }
      }
    }
    rows->emplace_back(std::move(values));
  }
  return sqlite3_changes64(db_.get());
}

void SqliteDatabase::exec_simple(const char* sql) {
  char* error = nullptr;
  int rc = sqlite3_exec(db_.get(), sql, nullptr, nullptr, &error);
  std::unique_ptr<char, decltype(&sqlite3_free)> owned(error, &sqlite3_free);
  if (rc != SQLITE_OK) throw_sqlite(db_.get(), rc, sql);
}

// ---------------------------------------------------------------------------------------------

SqliteTransaction::SqliteTransaction(SqliteDatabase& db, Mode mode) : db_(&db) {
  if (db.in_transaction_) {
    throw DatabaseError("a transaction is already open on this SQLite connection (one at a time)");
  }
  db.exec_simple(mode == Mode::immediate ? "BEGIN IMMEDIATE" : "BEGIN DEFERRED");
  db.in_transaction_ = true;
}

SqliteTransaction::SqliteTransaction(SqliteTransaction&& other) noexcept : db_(other.db_) { other.db_ = nullptr; }

SqliteTransaction::~SqliteTransaction() { rollback(); }

SqliteDatabase& SqliteTransaction::checked_db() const {
  if (db_ == nullptr) throw DatabaseError("the SQLite transaction is already finished");
  return *db_;
}

SqliteDatabase& SqliteTransaction::database() const { return checked_db(); }

std::int64_t SqliteTransaction::execute(std::string_view sql, const Params& params) {
  return checked_db().run(sql, params, nullptr);
}

std::vector<Row> SqliteTransaction::query(std::string_view sql, const Params& params) {
  std::vector<Row> rows;
  checked_db().run(sql, params, &rows);
  return rows;
}

void SqliteTransaction::execute_script(std::string_view sql) { checked_db().exec_simple(std::string(sql).c_str()); }

std::int64_t SqliteTransaction::last_insert_id() const noexcept {
  return db_ == nullptr ? 0 : sqlite3_last_insert_rowid(db_->db_.get());
}

void SqliteTransaction::commit() {
  auto& db = checked_db();
  try {
    db.exec_simple("COMMIT");
  } catch (...) {
    rollback();
    throw;
  }
  db.in_transaction_ = false;
  db_ = nullptr;
}

void SqliteTransaction::rollback() noexcept {
  if (db_ == nullptr) return;
  sqlite3* handle = db_->db_.get();
  // Some errors (disk full, I/O) end the transaction inside SQLite already.
  if (sqlite3_get_autocommit(handle) == 0) {
    int rc = sqlite3_exec(handle, "ROLLBACK", nullptr, nullptr, nullptr);
    if (rc != SQLITE_OK) {
      try {
        detail::logger()->warn("natspubsub: SQLite ROLLBACK failed: {}", sqlite3_errmsg(handle));
      } catch (...) {  // logging must not throw out of a destructor
      }
    }
  }
  db_->in_transaction_ = false;
  db_ = nullptr;
}

}  // namespace natspubsub::store
