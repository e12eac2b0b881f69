#include <natspubsub/inbox.hpp>

#include <algorithm>

#include <natspubsub/features.hpp>
#include <natspubsub/store/sqlite.hpp>
#if NATSPUBSUB_HAS_POSTGRES
#include <natspubsub/store/postgres.hpp>
#endif

#include "store/inbox_internal.hpp"
#include "store/outbox_internal.hpp"

namespace natspubsub {

std::string_view to_string(InboxResult result) noexcept {
  return result == InboxResult::processed ? "processed" : "duplicate";
}

std::string_view to_string(InboxStatus status) noexcept {
  switch (status) {
    case InboxStatus::processing: return "processing";
    case InboxStatus::processed: return "processed";
    case InboxStatus::failed: return "failed";
  }
  return "unknown";
}

std::unique_ptr<Inbox> make_inbox(store::Database& db) {
  if (db.backend() == store::Backend::sqlite) {
    return detail::make_sqlite_inbox(dynamic_cast<store::SqliteDatabase&>(db));
  }
#if NATSPUBSUB_HAS_POSTGRES
  return detail::make_postgres_inbox(dynamic_cast<store::PostgresDatabase&>(db));
#else
  throw store::DatabaseError("this build of natspubsub has no PostgreSQL support");
#endif
}

namespace detail {

std::unique_ptr<InboxBatch> begin_inbox_batch(store::Database& db) {
  if (db.backend() == store::Backend::sqlite) {
    return begin_sqlite_inbox_batch(dynamic_cast<store::SqliteDatabase&>(db));
  }
#if NATSPUBSUB_HAS_POSTGRES
  return begin_postgres_inbox_batch(dynamic_cast<store::PostgresDatabase&>(db));
#else
  throw store::DatabaseError("this build of natspubsub has no PostgreSQL support");
#endif
}

InboxRecord inbox_record_from(const store::Row& row) {
  InboxRecord out;
  out.consumer = row.as_text(0);
  out.event_id = row.as_text(1);
  out.subject = row.as_text(2);
  out.stream = row.as_text(3);
  out.stream_seq = row.as_int(4);
  auto status = row.as_text(5);
  out.status = status == "processed" ? InboxStatus::processed
               : status == "failed"  ? InboxStatus::failed
                                     : InboxStatus::processing;
  out.deliveries = static_cast<int>(row.as_int(6));
  out.last_error = row[7].as_optional_text();
  out.received_at = from_unix_ms(row.as_int(8));
  if (!row.is_null(9)) out.processed_at = from_unix_ms(row.as_int(9));
  return out;
}

void validate_inbox_key(const InboxKey& key) {
  if (key.consumer.empty()) throw InboxError("inbox key: consumer is empty");
  if (key.event_id.empty()) throw InboxError("inbox key for consumer " + key.consumer + ": event_id is empty");
}

int next_deliveries(std::optional<std::int64_t> previous, int nats_deliveries) {
  auto next = previous ? *previous + 1 : 1;
  return static_cast<int>(std::max<std::int64_t>(next, nats_deliveries));
}

std::string describe(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    return bounded_error(e.what());
  } catch (...) {
    return "unknown exception (not derived from std::exception)";
  }
}

}  // namespace detail

}  // namespace natspubsub
