#include <natspubsub/outbox.hpp>

#include <algorithm>

#include <natspubsub/features.hpp>
#include <natspubsub/store/sqlite.hpp>

#if NATSPUBSUB_HAS_POSTGRES
#include <pqxx/dbtransaction>

#include <natspubsub/store/postgres.hpp>

#include "store/postgres_exec.hpp"
#endif

#include "store/logger.hpp"
#include "store/outbox_internal.hpp"

namespace natspubsub {

namespace {

#if NATSPUBSUB_HAS_POSTGRES
// Class id of the transaction-scoped advisory lock enqueue takes per partition key (the object
// id is hashtext(key)); "NPSB" in ASCII. Distinct from the single-bigint locks of the claim and
// the migration runner, which live in another key space.
constexpr std::int32_t kPartitionLockClass = 0x4e505342;
#endif

constexpr std::string_view kInsert =
    "INSERT INTO natspubsub_outbox (event_id, subject, payload, headers, partition_key) "
    "VALUES ($1, $2, $3, $4, $5)";

void validate(const OutboxMessage& m) {
  if (m.event_id.empty()) throw OutboxError("outbox message: event_id is empty");
  if (m.subject.empty()) throw OutboxError("outbox message " + m.event_id + ": subject is empty");
  for (char c : m.subject) {
    if (c == ' ' || c == '\t' || c == '\r' || c == '\n') {
      throw OutboxError("outbox message " + m.event_id + ": subject '" + m.subject + "' contains whitespace");
    }
  }
  if (!m.headers.is_object()) throw OutboxError("outbox message " + m.event_id + ": headers must be a JSON object");
  for (const auto& [name, value] : m.headers.items()) {
    if (!value.is_string()) {
      throw OutboxError("outbox message " + m.event_id + ": header '" + name + "' must be a string");
    }
    // A NATS header is one text line: CR, LF or NUL cannot be published literally, so such a row
    // is refused now rather than altered or failed later by the relay.
    auto bad = [](char c) { return c == '\r' || c == '\n' || c == '\0'; };
    const auto& text = value.get_ref<const std::string&>();
    if (std::any_of(name.begin(), name.end(), [&](char c) { return bad(c) || c == ':' || c == ' ' || c == '\t'; }) ||
        name.empty()) {
      throw OutboxError("outbox message " + m.event_id + ": a header name is empty or has CR, LF, NUL, ':' or blanks");
    }
    if (std::any_of(text.begin(), text.end(), bad)) {
      throw OutboxError("outbox message " + m.event_id + ": header '" + name + "' has a CR, LF or NUL byte in its value");
    }
  }
  if (m.partition_key && m.partition_key->empty()) {
    throw OutboxError("outbox message " + m.event_id + ": partition_key is empty (leave it unset for no key)");
  }
}

}  // namespace

#if NATSPUBSUB_HAS_POSTGRES
std::int64_t enqueue(pqxx::dbtransaction& txn, const OutboxMessage& message) {
  validate(message);
  pqxx::transaction_base& base = txn;
  if (message.partition_key) {
    // Held until the caller commits: ids of one key are then handed out in commit order, so the
    // relay can never see a later id of the key committed while an earlier one is still in flight.
    store::detail::pg_exec(base, "SELECT pg_advisory_xact_lock($1::integer, hashtext($2))",
                           {kPartitionLockClass, *message.partition_key});
  }
  auto rows = store::detail::to_rows(store::detail::pg_exec(
      base, std::string(kInsert) + " RETURNING id",
      {message.event_id, message.subject, message.payload, message.headers.dump(), message.partition_key}));
  return rows.at(0).as_int(0);
}
#endif

std::int64_t enqueue(store::SqliteTransaction& txn, const OutboxMessage& message) {
  validate(message);
  // SQLite has one writer at a time, so ids are handed out in commit order without a lock.
  txn.execute(kInsert, {message.event_id, message.subject, message.payload, message.headers.dump(),
                        message.partition_key});
  return txn.last_insert_id();
}

std::int64_t enqueue(store::Transaction& txn, const OutboxMessage& message) {
#if NATSPUBSUB_HAS_POSTGRES
  if (txn.backend() == store::Backend::sqlite) return enqueue(txn.sqlite(), message);
  return enqueue(txn.postgres(), message);
#else
  return enqueue(txn.sqlite(), message);
#endif
}

std::string_view to_string(OutboxStatus status) noexcept {
  switch (status) {
    case OutboxStatus::pending: return "pending";
    case OutboxStatus::publishing: return "publishing";
    case OutboxStatus::sent: return "sent";
    case OutboxStatus::failed: return "failed";
  }
  return "unknown";
}

OutboxStatus outbox_status_from_string(std::string_view name) {
  if (name == "pending") return OutboxStatus::pending;
  if (name == "publishing") return OutboxStatus::publishing;
  if (name == "sent") return OutboxStatus::sent;
  if (name == "failed") return OutboxStatus::failed;
  throw OutboxError("unknown outbox status '" + std::string(name) + "'");
}

std::unique_ptr<OutboxStore> make_outbox_store(store::Database& db) {
  if (db.backend() == store::Backend::sqlite) {
    return detail::make_sqlite_outbox_store(dynamic_cast<store::SqliteDatabase&>(db));
  }
#if NATSPUBSUB_HAS_POSTGRES
  return detail::make_postgres_outbox_store(dynamic_cast<store::PostgresDatabase&>(db));
#else
  throw store::DatabaseError("this build of natspubsub has no PostgreSQL support");
#endif
}

namespace detail {

OutboxRow outbox_row_from(const store::Row& row) {
  OutboxRow out;
  out.id = row.as_int(0);
  out.event_id = row.as_text(1);
  out.subject = row.as_text(2);
  out.payload = row.as_text(3);
  auto headers = nlohmann::json::parse(row.as_text(4), nullptr, /*allow_exceptions=*/false);
  if (headers.is_object()) {
    out.headers = std::move(headers);
  } else {
    // The schema checks headers; a row that still has bad ones is published without them.
    store::detail::logger()->warn("natspubsub: outbox row {} has headers that are not a JSON object; ignored", out.id);
  }
  out.partition_key = row[5].as_optional_text();
  out.status = outbox_status_from_string(row.as_text(6));
  out.attempts = static_cast<int>(row.as_int(7));
  out.last_error = row[8].as_optional_text();
  out.next_attempt_at = from_unix_ms(row.as_int(9));
  out.created_at = from_unix_ms(row.as_int(10));
  return out;
}

std::string ids_json(std::span<const std::int64_t> ids) {
  return nlohmann::json(std::vector<std::int64_t>(ids.begin(), ids.end())).dump();
}

std::string failures_json(std::span<const OutboxFailure> failures) {
  auto array = nlohmann::json::array();
  for (const auto& f : failures) {
    array.push_back({{"id", f.id}, {"error", bounded_error(f.error)}, {"delay_ms", std::max<std::int64_t>(0, f.retry_delay.count())}});
  }
  // Error texts come from anywhere: replace invalid UTF-8 rather than fail the whole batch.
  return array.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::string bounded_error(std::string_view error) {
  // Stored in text columns: cut to a bounded size and keep it valid UTF-8 (PostgreSQL refuses
  // anything else), replacing broken sequences with '?'.
  constexpr std::size_t kMaxErrorLength = 2000;
  std::string out;
  out.reserve(std::min(error.size(), kMaxErrorLength) + 3);
  std::size_t i = 0;
  while (i < error.size() && out.size() < kMaxErrorLength) {
    auto c = static_cast<unsigned char>(error[i]);
    std::size_t length = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    bool valid = c != 0 && length != 0 && i + length <= error.size();
    for (std::size_t k = 1; valid && k < length; ++k) {
      valid = (static_cast<unsigned char>(error[i + k]) & 0xc0) == 0x80;
    }
    if (!valid) {
      out += '?';
      ++i;
      continue;
    }
    out.append(error.substr(i, length));
    i += length;
  }
  if (i < error.size()) out += "...";
  return out;
}

std::int64_t unix_ms_now() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

SystemTime from_unix_ms(std::int64_t ms) { return SystemTime(std::chrono::milliseconds(ms)); }

}  // namespace detail

}  // namespace natspubsub
