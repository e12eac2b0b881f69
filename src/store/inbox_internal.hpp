#pragma once
// Shared by the SQLite and PostgreSQL inboxes (not installed).
#include <exception>
#include <memory>
#include <optional>
#include <string>

#include <natspubsub/inbox.hpp>
#include <natspubsub/store/database.hpp>

namespace natspubsub::store {
class SqliteDatabase;
class PostgresDatabase;
}  // namespace natspubsub::store

namespace natspubsub::detail {

[[nodiscard]] std::unique_ptr<Inbox> make_sqlite_inbox(store::SqliteDatabase& db);
[[nodiscard]] std::unique_ptr<Inbox> make_postgres_inbox(store::PostgresDatabase& db);

/// A row selected as: consumer, event_id, subject, stream, stream_seq, status, deliveries,
/// last_error, received_at (Unix ms), processed_at (Unix ms or NULL).
[[nodiscard]] InboxRecord inbox_record_from(const store::Row& row);

/// Throws InboxError when consumer or event_id is empty.
void validate_inbox_key(const InboxKey& key);

/// The deliveries count of this delivery: one more than seen before, at least NATS's count.
[[nodiscard]] int next_deliveries(std::optional<std::int64_t> previous, int nats_deliveries);

/// What a handler exception says, for last_error.
[[nodiscard]] std::string describe(const std::exception_ptr& error);

}  // namespace natspubsub::detail
