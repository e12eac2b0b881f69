#pragma once
// SQLite: one connection per SqliteDatabase, in WAL mode (readers do not block the writer),
// with a busy timeout and foreign keys on. Statements are prepared once and cached.
// Placeholders: `$1`, `$2`, ... (by number, like PostgreSQL) or plain `?` (by position).
//
//   natspubsub::store::SqliteDatabase db("/var/lib/orders/orders.db");
//   auto tx = db.begin();
//   tx.execute("INSERT INTO orders (id, total) VALUES ($1, $2)", {42, 99.5});
//   natspubsub::enqueue(tx, message);
//   tx.commit();  // without commit() the destructor rolls back
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <natspubsub/store/database.hpp>

struct sqlite3;
struct sqlite3_stmt;

namespace natspubsub::store {

class SqliteDatabase;

/// A transaction on a SqliteDatabase; move-only. The destructor rolls back what was not
/// committed and never throws. Runs the caller's own SQL as well as the library's.
///
///   auto tx = db.begin();
///   auto rows = tx.query("SELECT qty FROM stock WHERE sku = $1", {"ABC-1"});
///   tx.execute("UPDATE stock SET qty = $1 WHERE sku = $2", {rows.at(0).as_int(0) - 1, "ABC-1"});
///   tx.commit();
class SqliteTransaction {
 public:
  /// immediate takes the write lock at BEGIN, so a writer waits (busy timeout) up front instead
  /// of failing half-way when it first writes; deferred is for read-only work.
  enum class Mode { immediate, deferred };

  SqliteTransaction(SqliteTransaction&& other) noexcept;
  SqliteTransaction& operator=(SqliteTransaction&&) = delete;
  SqliteTransaction(const SqliteTransaction&) = delete;
  SqliteTransaction& operator=(const SqliteTransaction&) = delete;
  ~SqliteTransaction();

  /// Runs one statement; returns the number of rows it changed.
  std::int64_t execute(std::string_view sql, const Params& params = {});
  /// Runs one statement and returns all its rows.
  [[nodiscard]] std::vector<Row> query(std::string_view sql, const Params& params = {});
  /// Runs several statements without parameters, e.g. a schema script.
  void execute_script(std::string_view sql);
  /// The rowid of the last row this connection inserted.
  [[nodiscard]] std::int64_t last_insert_id() const noexcept;

  void commit();
  /// Undoes everything; the transaction is finished afterwards. Does nothing when finished.
  void rollback() noexcept;
  [[nodiscard]] bool active() const noexcept { return db_ != nullptr; }
  [[nodiscard]] SqliteDatabase& database() const;

 private:
  friend class SqliteDatabase;
  SqliteTransaction(SqliteDatabase& db, Mode mode);
  SqliteDatabase& checked_db() const;

  SqliteDatabase* db_;
};

/// An SQLite database file. Opening creates the file if needed and sets WAL mode, the busy
/// timeout and foreign keys; it throws DatabaseError when the file cannot be opened.
/// One thread at a time (give each thread its own object; several may open one file).
///
///   natspubsub::store::SqliteDatabase db("orders.db", {.busy_timeout = std::chrono::seconds(2)});
///   natspubsub::store::migrate(db);
class SqliteDatabase final : public Database {
 public:
  struct Options {
    std::chrono::milliseconds busy_timeout{5000};
    /// false: a missing file is a DatabaseError, not a new empty database (a typo in a path
    /// must not look like an empty outbox).
    bool create = true;
  };

  explicit SqliteDatabase(const std::string& path) : SqliteDatabase(path, Options{}) {}
  SqliteDatabase(const std::string& path, Options options);
  ~SqliteDatabase() override;

  /// Starts a transaction. Only one can be open on a connection at a time.
  [[nodiscard]] SqliteTransaction begin(SqliteTransaction::Mode mode = SqliteTransaction::Mode::immediate);

  /// Runs one statement outside any explicit transaction (SQLite commits it by itself).
  std::int64_t execute(std::string_view sql, const Params& params = {});
  [[nodiscard]] std::vector<Row> query(std::string_view sql, const Params& params = {});

  [[nodiscard]] Backend backend() const noexcept override { return Backend::sqlite; }
  [[nodiscard]] const std::string& description() const noexcept override { return description_; }
  void in_transaction(const std::function<void(Transaction&)>& fn) override;

  [[nodiscard]] const std::string& path() const noexcept { return path_; }
  [[nodiscard]] bool transaction_open() const noexcept { return in_transaction_; }
  /// The raw handle, for what this class does not wrap. It stays owned by this object.
  [[nodiscard]] sqlite3* handle() const noexcept { return db_.get(); }

 private:
  friend class SqliteTransaction;
  struct CloseDb {
    void operator()(sqlite3* db) const noexcept;
  };
  struct FinalizeStmt {
    void operator()(sqlite3_stmt* stmt) const noexcept;
  };
  using StmtPtr = std::unique_ptr<sqlite3_stmt, FinalizeStmt>;

  /// Prepares (or takes from the cache), binds, steps to the end, resets.
  std::int64_t run(std::string_view sql, const Params& params, std::vector<Row>* rows);
  sqlite3_stmt* prepare(std::string_view sql);
  /// Statements without parameters or results (BEGIN, COMMIT, PRAGMA ...).
  void exec_simple(const char* sql);

  std::string path_;
  std::string description_;
  std::unique_ptr<sqlite3, CloseDb> db_;
  // A small cache: the library's statements and the caller's recurring ones are prepared once.
  std::unordered_map<std::string, StmtPtr> statements_;
  bool in_transaction_ = false;
};

}  // namespace natspubsub::store
