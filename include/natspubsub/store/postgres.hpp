#pragma once
// PostgreSQL through libpqxx 6.4: one `pqxx::connection` per PostgresDatabase. Your code keeps
// using libpqxx directly (`pqxx::work`, `exec_params`); the library's statements are always
// parameterised, and its failures come out as the typed errors of store/database.hpp.
//
//   natspubsub::store::PostgresDatabase db("postgresql://app:secret@db:5432/orders");
//   pqxx::work tx(db.connection());
//   tx.exec_params("INSERT INTO orders (id, total) VALUES ($1, $2)", 42, 99.5);
//   natspubsub::enqueue(tx, message);
//   tx.commit();
#include <natspubsub/features.hpp>
#if !NATSPUBSUB_HAS_POSTGRES
#error "natspubsub was built without PostgreSQL (NATSPUBSUB_WITH_POSTGRES=OFF): store/postgres.hpp is not available"
#endif

#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include <pqxx/connection>

#include <natspubsub/store/database.hpp>

namespace natspubsub::store {

enum class Isolation { read_committed, repeatable_read, serializable };

/// A connection to PostgreSQL, opened from a URL (see DatabaseUrl). The constructor connects
/// or throws (RetryableDatabaseError when the server cannot be reached, DatabaseUrlError for a
/// bad URL); no message ever contains the password. One thread at a time.
///
///   natspubsub::store::PostgresDatabase db(url);
///   db.in_transaction([&](natspubsub::store::Transaction& tx) { natspubsub::enqueue(tx, msg); });
class PostgresDatabase final : public Database {
 public:
  explicit PostgresDatabase(std::string_view url);
  explicit PostgresDatabase(DatabaseUrl url);
  ~PostgresDatabase() override;

  /// The libpqxx connection, for your own transactions.
  [[nodiscard]] pqxx::connection& connection() noexcept { return *connection_; }
  [[nodiscard]] const DatabaseUrl& url() const noexcept { return url_; }

  [[nodiscard]] Backend backend() const noexcept override { return Backend::postgres; }
  [[nodiscard]] const std::string& description() const noexcept override { return url_.redacted(); }
  void in_transaction(const std::function<void(Transaction&)>& fn) override {
    in_transaction(fn, Isolation::read_committed);
  }
  /// As above, at the given isolation level. A serialization failure surfaces as
  /// RetryableDatabaseError.
  void in_transaction(const std::function<void(Transaction&)>& fn, Isolation isolation);

  /// Runs one statement in its own transaction; returns the number of rows it changed.
  std::int64_t execute(std::string_view sql, const Params& params = {});
  [[nodiscard]] std::vector<Row> query(std::string_view sql, const Params& params = {});

 private:
  DatabaseUrl url_;
  std::unique_ptr<pqxx::connection> connection_;
};

/// Turns the exception in flight into the library's error types and throws that: libpqxx
/// errors are classified by SQLSTATE (23505 -> UniqueViolationError; 40001, 40P01, class 08,
/// lost connection -> RetryableDatabaseError; else DatabaseError with the query); `context`
/// prefixes the message and `url` (when given) scrubs its password from it. Anything that is
/// not a libpqxx error is rethrown unchanged. Call only inside a catch block.
///
///   try { tx.exec_params(sql, id); } catch (...) { rethrow_postgres_error("saving order", &db.url()); }
[[noreturn]] void rethrow_postgres_error(std::string_view context, const DatabaseUrl* url = nullptr);

}  // namespace natspubsub::store
