#pragma once
// The schema migrations (migrations/sqlite and migrations/postgres, compiled into the library)
// and their runner. The runner applies the pending ones in version order, each in its own
// transaction together with its row in natspubsub_schema_migrations, so running it again changes
// nothing. On PostgreSQL every step holds a transaction-scoped advisory lock, so processes that
// start at the same time take turns: one applies, the others find the work done.
//
//   natspubsub::store::PostgresDatabase db(url);
//   auto applied = natspubsub::store::migrate(db);  // e.g. {1} the first time, {} afterwards
#include <string_view>
#include <vector>

#include <natspubsub/features.hpp>
#include <natspubsub/store/database.hpp>

namespace natspubsub::store {

class SqliteDatabase;
class PostgresDatabase;

struct Migration {
  int version = 0;
  std::string_view name;  ///< the file name, e.g. "0001_outbox_inbox.sql"
  std::string_view sql;   ///< the file's contents
};

/// The migrations built into the library for `backend`, in ascending version order.
[[nodiscard]] std::vector<Migration> migrations(Backend backend);

/// Applies the pending migrations; returns the versions this call applied (empty when the
/// schema was already current). Throws DatabaseError (typed) when a migration fails; the
/// failing migration leaves nothing behind, the ones before it stay applied.
std::vector<int> migrate(SqliteDatabase& db);
#if NATSPUBSUB_HAS_POSTGRES
std::vector<int> migrate(PostgresDatabase& db);
#endif
std::vector<int> migrate(Database& db);

/// The versions recorded in natspubsub_schema_migrations (empty when the table does not exist).
[[nodiscard]] std::vector<int> applied_migrations(SqliteDatabase& db);
#if NATSPUBSUB_HAS_POSTGRES
[[nodiscard]] std::vector<int> applied_migrations(PostgresDatabase& db);
#endif
[[nodiscard]] std::vector<int> applied_migrations(Database& db);

}  // namespace natspubsub::store
