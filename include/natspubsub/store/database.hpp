#pragma once
// What both databases share: the typed errors, database URLs, parameter values and result rows,
// the `Database` interface and a `Transaction` handle that is either database's transaction.
//
//   auto db = natspubsub::store::open_database("sqlite:///var/lib/orders/orders.db");
//   natspubsub::store::migrate(*db);
//   db->in_transaction([&](natspubsub::store::Transaction& tx) {
//     tx.execute("INSERT INTO orders (id, total) VALUES ($1, $2)", {order_id, total});
//     natspubsub::enqueue(tx, message);  // commits or rolls back with the order
//   });
//
// Errors: UniqueViolationError (a unique key already exists), RetryableDatabaseError
// (serialization failure, deadlock, lost connection, SQLite busy/locked: run the transaction
// again), DatabaseUrlError, else DatabaseError. None of their messages contains a password.
#include <chrono>
#include <concepts>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include <natspubsub/error.hpp>
#include <natspubsub/features.hpp>

#if NATSPUBSUB_HAS_POSTGRES
namespace pqxx {
class dbtransaction;
}  // namespace pqxx
#endif

namespace natspubsub::store {

enum class Backend { sqlite, postgres };
[[nodiscard]] std::string_view to_string(Backend backend) noexcept;

/// A database call failed. `code()` is the SQLSTATE on PostgreSQL ("42P01") and the SQLite
/// result code name on SQLite ("SQLITE_CONSTRAINT_NOTNULL"); `query()` is the failing SQL
/// (never its parameter values), empty when there was none (e.g. connecting).
class DatabaseError : public Error {
 public:
  explicit DatabaseError(const std::string& message, std::string code = {}, std::string query = {})
      : Error(message), code_(std::move(code)), query_(std::move(query)) {}
  [[nodiscard]] const std::string& code() const noexcept { return code_; }
  [[nodiscard]] const std::string& query() const noexcept { return query_; }

 private:
  std::string code_;
  std::string query_;
};

/// A unique or primary key constraint refused a row (SQLSTATE 23505, SQLITE_CONSTRAINT_UNIQUE
/// or _PRIMARYKEY): e.g. an outbox event_id that is already there.
class UniqueViolationError : public DatabaseError {
 public:
  using DatabaseError::DatabaseError;
};

/// Nothing is wrong with the request: running the whole transaction again may succeed.
/// Serialization failure (40001), deadlock (40P01), lost or refused connection, SQLite busy or
/// locked (another connection holds the write lock beyond the busy timeout).
class RetryableDatabaseError : public DatabaseError {
 public:
  using DatabaseError::DatabaseError;
};

/// A database URL is malformed. The message shows the URL with its password replaced by "***".
class DatabaseUrlError : public DatabaseError {
 public:
  using DatabaseError::DatabaseError;
};

/// A parsed database URL:
///   sqlite:///absolute/path.db     sqlite://relative/path.db
///   postgresql://user:pass@host:port/dbname?sslmode=require   (also postgres://)
/// A PostgreSQL URI is libpq's: PQconninfoParse reads it, so every form libpq documents works
/// (postgresql:///orders?host=/run/postgresql, several hosts, any connection parameter), and it
/// reaches libpq as written, with connect_timeout=10 added when it sets none.
///
///   auto url = DatabaseUrl::parse("postgresql://app:s3cret@db:5432/orders");
///   url.redacted();  // "postgresql://app:***@db:5432/orders"
class DatabaseUrl {
 public:
  /// Throws DatabaseUrlError (without the password) when the URL is not one of the forms above.
  [[nodiscard]] static DatabaseUrl parse(std::string_view url);

  [[nodiscard]] Backend backend() const noexcept { return backend_; }
  /// SQLite: the file path as written (relative paths are relative to the working directory).
  [[nodiscard]] const std::string& path() const noexcept { return path_; }
  [[nodiscard]] const std::string& user() const noexcept { return user_; }
  [[nodiscard]] const std::string& host() const noexcept { return host_; }
  [[nodiscard]] int port() const noexcept { return port_; }
  [[nodiscard]] const std::string& database() const noexcept { return database_; }
  [[nodiscard]] bool has_password() const noexcept { return !password_.empty(); }
  /// The URL with the password replaced by "***": safe for logs and error messages.
  [[nodiscard]] const std::string& redacted() const noexcept { return redacted_; }
  /// What libpq gets: the URI (contains the password: never log it).
  [[nodiscard]] std::string postgres_conninfo() const;
  /// `text` with every occurrence of the password (plain and percent-encoded) replaced by "***".
  [[nodiscard]] std::string scrub(std::string text) const;

 private:
  Backend backend_ = Backend::sqlite;
  std::string path_;
  std::string user_;
  std::string password_;
  std::string raw_password_;  // as written in the URL, possibly percent-encoded
  std::string host_;        // as libpq read it: may be a list, or a socket directory
  int port_ = 5432;         // the first port
  std::string port_text_;   // as libpq read it
  std::string database_;
  std::string uri_;         // PostgreSQL: what libpq gets
  bool has_connect_timeout_ = false;
  std::string redacted_;
};

/// One SQL parameter or result value: NULL, integer, real or text.
///
///   tx.execute("UPDATE stock SET qty = qty - $1 WHERE sku = $2", {3, "ABC-1"});
class Value {
 public:
  Value() noexcept = default;  ///< NULL
  Value(std::nullptr_t) noexcept {}
  template <std::integral I>
  Value(I v) noexcept : v_(static_cast<std::int64_t>(v)) {}
  Value(double v) noexcept : v_(v) {}
  Value(std::string v) noexcept : v_(std::move(v)) {}
  Value(std::string_view v) : v_(std::string(v)) {}
  Value(const char* v) {  // a null pointer is NULL
    if (v != nullptr) v_ = std::string(v);
  }
  template <typename T>
  Value(const std::optional<T>& v) {  // std::nullopt is NULL
    if (v) *this = Value(*v);
  }

  [[nodiscard]] bool is_null() const noexcept { return std::holds_alternative<std::monostate>(v_); }
  [[nodiscard]] bool is_int() const noexcept { return std::holds_alternative<std::int64_t>(v_); }
  [[nodiscard]] bool is_real() const noexcept { return std::holds_alternative<double>(v_); }
  [[nodiscard]] bool is_text() const noexcept { return std::holds_alternative<std::string>(v_); }
  /// Integer value; text holding a decimal integer (PostgreSQL results) is converted.
  /// Throws DatabaseError for NULL or anything else.
  [[nodiscard]] std::int64_t as_int() const;
  [[nodiscard]] double as_real() const;
  /// Text value; numbers are formatted. Throws DatabaseError for NULL.
  [[nodiscard]] std::string as_text() const;
  [[nodiscard]] std::optional<std::string> as_optional_text() const;
  [[nodiscard]] std::optional<std::int64_t> as_optional_int() const;

 private:
  std::variant<std::monostate, std::int64_t, double, std::string> v_;
};

using Params = std::vector<Value>;

/// One result row. Columns are addressed by position, as in the SELECT list.
class Row {
 public:
  Row() = default;
  explicit Row(std::vector<Value> values) : values_(std::move(values)) {}
  [[nodiscard]] std::size_t size() const noexcept { return values_.size(); }
  /// Throws DatabaseError when `column` is out of range.
  [[nodiscard]] const Value& operator[](std::size_t column) const;
  [[nodiscard]] bool is_null(std::size_t column) const { return (*this)[column].is_null(); }
  [[nodiscard]] std::int64_t as_int(std::size_t column) const { return (*this)[column].as_int(); }
  [[nodiscard]] std::string as_text(std::size_t column) const { return (*this)[column].as_text(); }

 private:
  std::vector<Value> values_;
};

class SqliteTransaction;

/// The caller's open transaction on either database, for code that works with both (enqueue,
/// inbox handlers). `execute`/`query` take `$1`, `$2`, ... placeholders on both databases.
///
///   inbox.process(key, [&](Transaction& tx) {
///     tx.execute("INSERT INTO payments (order_id, amount) VALUES ($1, $2)", {order_id, amount});
///   });
class Transaction {
 public:
  explicit Transaction(SqliteTransaction& txn) noexcept : sqlite_(&txn) {}
#if NATSPUBSUB_HAS_POSTGRES
  explicit Transaction(pqxx::dbtransaction& txn) noexcept : postgres_(&txn) {}
#endif

  [[nodiscard]] Backend backend() const noexcept { return sqlite_ ? Backend::sqlite : Backend::postgres; }
  /// The SQLite transaction; throws DatabaseError on PostgreSQL.
  [[nodiscard]] SqliteTransaction& sqlite() const;
#if NATSPUBSUB_HAS_POSTGRES
  /// The libpqxx transaction; throws DatabaseError on SQLite.
  [[nodiscard]] pqxx::dbtransaction& postgres() const;
#endif

  /// Runs one statement; returns the number of rows it changed.
  std::int64_t execute(std::string_view sql, const Params& params = {});
  /// Runs one statement and returns its rows (PostgreSQL values come back as text).
  [[nodiscard]] std::vector<Row> query(std::string_view sql, const Params& params = {});

  /// `fn` runs once, before the first statement through this handle or the first sqlite() /
  /// postgres() call. The batched inbox sets a message's SAVEPOINT this way only when its
  /// handler touches the database (a handler that writes nothing costs no round trip).
  void before_first_use(std::function<void()> fn) { before_first_use_ = std::move(fn); }

 private:
  void first_use() const {
    if (before_first_use_) {
      auto fn = std::move(before_first_use_);
      before_first_use_ = nullptr;
      fn();
    }
  }

  mutable std::function<void()> before_first_use_;
  SqliteTransaction* sqlite_ = nullptr;
#if NATSPUBSUB_HAS_POSTGRES
  pqxx::dbtransaction* postgres_ = nullptr;
#endif
};

/// An open database connection. Like the connections it wraps, one object is used by one thread
/// at a time; give each thread (relay, worker) its own.
class Database {
 public:
  virtual ~Database() = default;
  Database() = default;
  Database(const Database&) = delete;
  Database& operator=(const Database&) = delete;

  [[nodiscard]] virtual Backend backend() const noexcept = 0;
  /// Where the database is, without secrets (for logs).
  [[nodiscard]] virtual const std::string& description() const noexcept = 0;
  /// Runs `fn` in a new transaction: commits when it returns, rolls back when it throws (and
  /// rethrows; database failures as the typed errors above).
  virtual void in_transaction(const std::function<void(Transaction&)>& fn) = 0;
};

struct OpenOptions {
  /// SQLite: how long a statement waits for another connection's write lock before it fails
  /// with RetryableDatabaseError.
  std::chrono::milliseconds sqlite_busy_timeout{5000};
  /// SQLite: create the file when it does not exist. Tools that will not migrate pass false, so
  /// a mistyped path is refused instead of opening a new, empty database.
  bool create_sqlite_file = true;
};

/// Opens a SqliteDatabase or a PostgresDatabase from a URL (see DatabaseUrl).
/// Throws DatabaseUrlError, RetryableDatabaseError (cannot connect) or DatabaseError. A library
/// built without PostgreSQL (NATSPUBSUB_HAS_POSTGRES 0) refuses postgresql:// URLs with
/// DatabaseUrlError.
[[nodiscard]] std::unique_ptr<Database> open_database(std::string_view url, const OpenOptions& options = {});

}  // namespace natspubsub::store
