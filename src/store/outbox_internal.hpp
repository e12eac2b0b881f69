#pragma once
// Shared by the SQLite and PostgreSQL outbox stores (not installed).
#include <memory>
#include <span>
#include <string>

#include <natspubsub/outbox.hpp>
#include <natspubsub/store/database.hpp>

namespace natspubsub::store {
class SqliteDatabase;
class PostgresDatabase;
}  // namespace natspubsub::store

namespace natspubsub::detail {

[[nodiscard]] std::unique_ptr<OutboxStore> make_sqlite_outbox_store(store::SqliteDatabase& db);
[[nodiscard]] std::unique_ptr<OutboxStore> make_postgres_outbox_store(store::PostgresDatabase& db);
/// The store a relay uses on SQLite: takes the file's relay lock (ConfigError when another relay
/// holds it). `relay_claims`: claims that read (rows stay pending, written once with their
/// outcome) under an exclusive lock; else lease claims under a shared one (sqlite_outbox.cpp).
[[nodiscard]] std::unique_ptr<OutboxStore> make_sqlite_relay_store(store::SqliteDatabase& db, bool relay_claims);

/// A row selected as: id, event_id, subject, payload, headers (JSON text), partition_key,
/// status, attempts, last_error, next_attempt_at (Unix ms), created_at (Unix ms).
[[nodiscard]] OutboxRow outbox_row_from(const store::Row& row);

/// `[1,2,3]`: how a batch of ids travels as one statement parameter.
[[nodiscard]] std::string ids_json(std::span<const std::int64_t> ids);
/// `[{"id":1,"error":"...","delay_ms":500},...]`
[[nodiscard]] std::string failures_json(std::span<const OutboxFailure> failures);

/// Error texts are cut to a bounded size before they are stored.
[[nodiscard]] std::string bounded_error(std::string_view error);

[[nodiscard]] std::int64_t unix_ms_now();
[[nodiscard]] SystemTime from_unix_ms(std::int64_t ms);

}  // namespace natspubsub::detail
