// The outbox store on SQLite. Every operation is one BEGIN IMMEDIATE transaction: SQLite has
// one writer at a time, so claims (from any number of relay processes) are serialised by the
// database's write lock and always decide on the latest committed state.
//
// Two kinds of claims:
// - Lease claims (make_sqlite_outbox_store, and a relay with hold_claims off): a claim writes
//   its rows `publishing` with a lease; the marks touch only rows still held (OutboxStore).
// - Relay claims (make_sqlite_relay_store, the relay's default): the relay holds the file's
//   relay lock exclusively, so no other relay claims from this database, and a claim is a read:
//   its rows stay `pending` and each row is written once, with its outcome (sent, deleted, or
//   its failure). The store remembers the rows its claims returned and no outcome has settled
//   yet ("owned"): claims ahead never take them, and a keyed row behind one of them waits (the
//   per-key rule, as if they were held). A claim made ahead (mark_sent_and_claim, while the
//   last batch publishes) starts after the last owned row: rows below it wait for a claim from
//   the start, made by claim() and at least every kFullScanEvery by a claim ahead. claim() is
//   for when nothing is in flight (the relay makes it once its last batch's outcome is written):
//   it forgets what was owned, so rows whose outcome an error left unwritten are taken again.
#include <natspubsub/store/sqlite.hpp>

#include <fcntl.h>
#include <sqlite3.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <set>

#include <natspubsub/error.hpp>

#include "store/outbox_internal.hpp"

namespace natspubsub::detail {

namespace {

constexpr std::string_view kColumns =
    "id, event_id, subject, payload, headers, partition_key, status, attempts, last_error, next_attempt_at, "
    "created_at";

// $1 relay, $2 batch size, $3 now (ms), $4 lease end (ms), $5 largest id to take, $6 a relay whose
// rows are never taken even with their lease ended (NULL: none; the relay itself when it claims
// ahead, see OutboxStore::mark_sent_and_claim). The per-key rule is documented on
// OutboxStore: a keyed row is claimable only when every earlier unsent row of its key is
// claimable too (and so, by ORDER BY id, in the same batch). `status IN (...)` is repeated so
// SQLite can use the partial claim index.
constexpr std::string_view kClaim = R"sql(
UPDATE natspubsub_outbox
SET status = 'publishing', locked_by = $1, locked_until = $4
WHERE id IN (
  SELECT o.id FROM natspubsub_outbox AS o
  WHERE o.status IN ('pending', 'publishing') AND o.id <= $5
    AND ((o.status = 'pending' AND o.next_attempt_at <= $3)
         OR (o.status = 'publishing' AND COALESCE(o.locked_until, 0) < $3 AND o.locked_by IS NOT $6))
    AND (o.partition_key IS NULL OR NOT EXISTS (
          SELECT 1 FROM natspubsub_outbox AS e
          WHERE e.partition_key = o.partition_key AND e.id < o.id AND e.status <> 'sent'
            AND NOT ((e.status = 'pending' AND e.next_attempt_at <= $3)
                     OR (e.status = 'publishing' AND COALESCE(e.locked_until, 0) < $3 AND e.locked_by IS NOT $6))))
  ORDER BY o.id
  LIMIT $2)
RETURNING id, event_id, subject, payload, headers, partition_key, status, attempts, last_error, next_attempt_at,
          created_at)sql";

// The relay claim: a read. $1 batch size, $2 now (ms), $3 largest id to take, $4 the rows only
// after this id, $5 owned rows (a JSON array). A keyed row waits behind an earlier unsent row of
// its key that is not claimable, owned, or at or below $4 (it may be owned, or left out by an
// earlier claim: a claim from the start decides).
constexpr std::string_view kRelayClaim = R"sql(
SELECT id, event_id, subject, payload, headers, partition_key, status, attempts, last_error, next_attempt_at,
       created_at
FROM natspubsub_outbox AS o
WHERE o.status IN ('pending', 'publishing') AND o.id <= $3 AND o.id > $4
  AND o.id NOT IN (SELECT value FROM json_each($5))
  AND ((o.status = 'pending' AND o.next_attempt_at <= $2)
       OR (o.status = 'publishing' AND COALESCE(o.locked_until, 0) < $2))
  AND (o.partition_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM natspubsub_outbox AS e
        WHERE e.partition_key = o.partition_key AND e.id < o.id AND e.status <> 'sent'
          AND (e.id <= $4 OR e.id IN (SELECT value FROM json_each($5))
               OR NOT ((e.status = 'pending' AND e.next_attempt_at <= $2)
                       OR (e.status = 'publishing' AND COALESCE(e.locked_until, 0) < $2)))))
ORDER BY o.id
LIMIT $1)sql";

constexpr std::string_view kHeld = " AND status = 'publishing' AND locked_by = $1";
// Relay claims: the rows are `pending` (or `publishing` left by a lease relay before, taken
// with its lease ended); no other relay claims them. $1 is unused.
constexpr std::string_view kOwned = " AND status IN ('pending', 'publishing') AND $1 IS NOT NULL";
// $1 relay, $2 ids (a JSON array), $3 now (ms); followed by kHeld.
constexpr std::string_view kMarkSent =
    "UPDATE natspubsub_outbox SET status = 'sent', sent_at = $3, locked_by = NULL, locked_until = NULL "
    "WHERE id IN (SELECT value FROM json_each($2))";
constexpr std::string_view kDeleteSent = "DELETE FROM natspubsub_outbox WHERE id IN (SELECT value FROM json_each($2))";

// The relay lock: a file beside the database, `<path>-relay.lock`, locked with flock() for as
// long as the store lives (the kernel drops it when the process ends, however it ends). A relay
// with relay claims takes it exclusively, one with lease claims shared: two relays of which
// one claims by reading cannot run on one file. A database without a file (":memory:") has none.
class RelayLock {
 public:
  // `db`: the file as SQLite opened it (absolute, URIs resolved; none for an in-memory or
  // temporary database, which no other process can open).
  RelayLock(store::SqliteDatabase& db, bool exclusive) {
    const char* file = sqlite3_db_filename(db.handle(), "main");
    if (file == nullptr || *file == '\0') return;
    // By the file's real path: "outbox.db", "./outbox.db", a symlink and a URI share one lock.
    std::string real = file;
    if (char* resolved = ::realpath(file, nullptr); resolved != nullptr) {
      real = resolved;
      std::free(resolved);
    }
    path_ = real + "-relay.lock";
    for (int tries = 0;; ++tries) {
      // Read-only is enough for flock: a lock file another user created (an operator's run as
      // root) does not keep the service's own user out.
      fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
      if (fd_ < 0 && errno == EACCES) fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd_ < 0)
        throw ConfigError("relay.database", "cannot open the relay lock " + path_ + ": " + std::strerror(errno));
      if (::flock(fd_, (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB) != 0) {
        const int err = errno;
        close_fd();
        if (err == EWOULDBLOCK)
          throw ConfigError("relay.database",
                            "another relay is running on " + real + " (it holds " + path_ +
                                "): run one relay per SQLite database" +
                                (exclusive ? "" : " (or all of them with lease claims, --lease-claims)"));
        throw ConfigError("relay.database", "cannot lock " + path_ + ": " + std::strerror(err));
      }
      // Locked; but if the file was deleted (or replaced) meanwhile, another relay may lock the
      // new one: lock what is at the path now.
      struct stat held{}, now{};
      if (::fstat(fd_, &held) == 0 && ::stat(path_.c_str(), &now) == 0 && held.st_dev == now.st_dev &&
          held.st_ino == now.st_ino)
        return;
      close_fd();
      if (tries == 3) throw ConfigError("relay.database", "the relay lock " + path_ + " keeps being replaced");
    }
  }
  RelayLock(const RelayLock&) = delete;
  RelayLock& operator=(const RelayLock&) = delete;
  ~RelayLock() { close_fd(); }  // releases the lock

 private:
  void close_fd() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  std::string path_;
  int fd_ = -1;
};

class SqliteOutboxStore final : public OutboxStore {
 public:
  enum class Claims { lease, relay };
  // A claim ahead is made from the start of the outbox at least this often (relay claims).
  static constexpr std::chrono::milliseconds kFullScanEvery{250};

  explicit SqliteOutboxStore(store::SqliteDatabase& db) : db_(db) {}
  SqliteOutboxStore(store::SqliteDatabase& db, Claims claims)
      : db_(db), claims_(claims), lock_(std::make_unique<RelayLock>(db, claims == Claims::relay)) {}

  std::vector<OutboxRow> claim(std::string_view relay_id, std::size_t batch_size, std::chrono::milliseconds lease,
                               std::int64_t up_to_id) override {
    if (claims_ == Claims::relay) return relay_claim({}, false, batch_size, up_to_id, false);
    lock_shared();
    return claim_after(relay_id, {}, false, batch_size, lease, up_to_id, false);
  }

  std::vector<OutboxRow> mark_sent_and_claim(std::string_view relay_id, std::span<const std::int64_t> sent_ids,
                                             bool delete_sent, std::size_t batch_size,
                                             std::chrono::milliseconds lease, std::int64_t up_to_id) override {
    if (claims_ == Claims::relay) return relay_claim(sent_ids, delete_sent, batch_size, up_to_id, true);
    lock_shared();
    return claim_after(relay_id, sent_ids, delete_sent, batch_size, lease, up_to_id, true);
  }

  // Relay claims: marks `sent_ids` (no longer owned), then reads the next batch (now owned).
  std::vector<OutboxRow> relay_claim(std::span<const std::int64_t> sent_ids, bool delete_sent,
                                     std::size_t batch_size, std::int64_t up_to_id, bool ahead) {
    if (batch_size == 0 && sent_ids.empty()) return {};
    const auto now = unix_ms_now();
    auto txn = db_.begin();
    if (!sent_ids.empty())
      txn.execute(std::string(delete_sent ? kDeleteSent : kMarkSent) + std::string(kOwned),
                  delete_sent ? store::Params{std::string_view("relay"), ids_json(sent_ids)}
                              : store::Params{std::string_view("relay"), ids_json(sent_ids), now});
    std::vector<store::Row> rows;
    // A claim not made ahead comes when nothing is in flight (the relay makes it after its last
    // batch's outcome is written): rows still owned are those whose outcome a failure left
    // unwritten (they are pending, as they were) and may be claimed again.
    if (!ahead) owned_.clear();
    if (batch_size > 0) {
      std::set<std::int64_t> owned = owned_;
      for (auto id : sent_ids) owned.erase(id);
      std::int64_t after = std::numeric_limits<std::int64_t>::min();
      const auto clock = std::chrono::steady_clock::now();
      if (ahead && clock < next_full_scan_ && !owned.empty()) after = *owned.rbegin();
      else next_full_scan_ = clock + kFullScanEvery;
      const std::vector<std::int64_t> owned_ids(owned.begin(), owned.end());
      rows = txn.query(kRelayClaim, {static_cast<std::int64_t>(batch_size), now, up_to_id, after, ids_json(owned_ids)});
    }
    txn.commit();
    settle(sent_ids);
    auto out = to_sorted_rows(rows);
    for (const auto& row : out) owned_.insert(row.id);
    return out;
  }

  std::vector<OutboxRow> claim_after(std::string_view relay_id, std::span<const std::int64_t> sent_ids,
                                     bool delete_sent, std::size_t batch_size, std::chrono::milliseconds lease,
                                     std::int64_t up_to_id, bool ahead) {
    if (batch_size == 0 && sent_ids.empty()) return {};
    auto now = unix_ms_now();
    auto txn = db_.begin();
    if (!sent_ids.empty())
      txn.execute(std::string(delete_sent ? kDeleteSent : kMarkSent) + std::string(kHeld),
                  delete_sent ? store::Params{relay_id, ids_json(sent_ids)} : store::Params{relay_id, ids_json(sent_ids), now});
    std::vector<store::Row> rows;
    if (batch_size > 0)
      rows = txn.query(kClaim, {relay_id, static_cast<std::int64_t>(batch_size), now, now + lease.count(), up_to_id,
                                ahead ? store::Value(relay_id) : store::Value()});
    txn.commit();
    return to_sorted_rows(rows);
  }

  std::size_t renew_lease(std::string_view relay_id, std::span<const std::int64_t> ids,
                          std::chrono::milliseconds lease) override {
    if (claims_ == Claims::relay) {  // no lease: the rows it owns stay its own
      return static_cast<std::size_t>(
          std::count_if(ids.begin(), ids.end(), [&](std::int64_t id) { return owned_.count(id) > 0; }));
    }
    return update_held(
        "UPDATE natspubsub_outbox SET locked_until = $3 WHERE id IN (SELECT value FROM json_each($2))",
        relay_id, ids, unix_ms_now() + lease.count());
  }

  std::size_t mark_sent(std::string_view relay_id, std::span<const std::int64_t> ids) override {
    return update_held(std::string(kMarkSent), relay_id, ids, unix_ms_now());
  }

  std::size_t delete_sent(std::string_view relay_id, std::span<const std::int64_t> ids) override {
    if (ids.empty()) return 0;
    auto txn = db_.begin();
    auto n = txn.execute(std::string(kDeleteSent) + std::string(held()), {relay_id, ids_json(ids)});
    txn.commit();
    settle(ids);
    return static_cast<std::size_t>(n);
  }

  OutboxFailResult mark_failed(std::string_view relay_id, std::span<const OutboxFailure> failures,
                               int max_attempts) override {
    OutboxFailResult result;
    if (failures.empty()) return result;
    max_attempts = std::max(max_attempts, 1);
    auto txn = db_.begin();
    auto rows = txn.query(R"sql(
UPDATE natspubsub_outbox
SET attempts = attempts + 1,
    last_error = f.error,
    status = CASE WHEN attempts + 1 >= $3 THEN 'failed' ELSE 'pending' END,
    next_attempt_at = $4 + f.delay_ms,
    locked_by = NULL,
    locked_until = NULL
FROM (SELECT json_extract(value, '$.id') AS fid, json_extract(value, '$.error') AS error,
             json_extract(value, '$.delay_ms') AS delay_ms
      FROM json_each($2)) AS f
WHERE natspubsub_outbox.id = f.fid)sql" + std::string(held()) + " RETURNING id, status",
                          {relay_id, failures_json(failures), max_attempts, unix_ms_now()});
    txn.commit();
    std::vector<std::int64_t> ids;
    for (const auto& f : failures) ids.push_back(f.id);
    settle(ids);
    for (const auto& row : rows) {
      (row.as_text(1) == "failed" ? result.failed : result.rescheduled).push_back(row.as_int(0));
    }
    std::sort(result.failed.begin(), result.failed.end());
    std::sort(result.rescheduled.begin(), result.rescheduled.end());
    return result;
  }

  std::size_t release(std::string_view relay_id, std::span<const std::int64_t> ids) override {
    if (claims_ == Claims::relay) {
      // Its rows are pending already (nothing is written for them); rows a lease relay had
      // left in `publishing` go back to pending.
      const auto owned = renew_lease(relay_id, ids, {});
      update_held(
          "UPDATE natspubsub_outbox SET status = 'pending', next_attempt_at = MIN(next_attempt_at, $3), "
          "locked_by = NULL, locked_until = NULL WHERE id IN (SELECT value FROM json_each($2)) AND status = 'publishing'",
          relay_id, ids, unix_ms_now());
      return owned;
    }
    return update_held(
        "UPDATE natspubsub_outbox SET status = 'pending', next_attempt_at = MIN(next_attempt_at, $3), locked_by = NULL, "
        "locked_until = NULL WHERE id IN (SELECT value FROM json_each($2))",
        relay_id, ids, unix_ms_now());
  }

  std::size_t cleanup_sent(std::chrono::milliseconds older_than, std::size_t batch_limit) override {
    if (batch_limit == 0) return 0;
    auto txn = db_.begin();
    auto n = txn.execute(
        "DELETE FROM natspubsub_outbox WHERE id IN ("
        " SELECT id FROM natspubsub_outbox WHERE status = 'sent' AND sent_at < $1 ORDER BY sent_at LIMIT $2)",
        {unix_ms_now() - older_than.count(), static_cast<std::int64_t>(batch_limit)});
    txn.commit();
    return static_cast<std::size_t>(n);
  }

  OutboxStats stats() override {
    auto txn = db_.begin(store::SqliteTransaction::Mode::deferred);
    auto rows = txn.query(
        "SELECT COALESCE(SUM(status = 'pending'), 0), COALESCE(SUM(status = 'publishing'), 0),"
        " COALESCE(SUM(status = 'sent'), 0), COALESCE(SUM(status = 'failed'), 0),"
        " MIN(CASE WHEN status IN ('pending', 'publishing') THEN created_at END),"
        " MIN(CASE WHEN status = 'pending' THEN next_attempt_at END), COALESCE(MAX(id), 0)"
        " FROM natspubsub_outbox");
    txn.commit();
    OutboxStats stats;
    const auto& row = rows.at(0);
    stats.pending = row.as_int(0);
    stats.publishing = row.as_int(1);
    stats.sent = row.as_int(2);
    stats.failed = row.as_int(3);
    if (!row.is_null(4)) {
      stats.oldest_unsent_age = std::chrono::milliseconds(std::max<std::int64_t>(0, unix_ms_now() - row.as_int(4)));
    }
    if (!row.is_null(5)) {
      stats.next_due_in = std::chrono::milliseconds(std::max<std::int64_t>(0, row.as_int(5) - unix_ms_now()));
    }
    stats.max_id = row.as_int(6);
    return stats;
  }

  std::vector<OutboxRow> list_failed(std::size_t limit) override {
    auto txn = db_.begin(store::SqliteTransaction::Mode::deferred);
    auto rows = txn.query("SELECT " + std::string(kColumns) +
                              " FROM natspubsub_outbox WHERE status = 'failed' ORDER BY id LIMIT $1",
                          {static_cast<std::int64_t>(limit)});
    txn.commit();
    return to_sorted_rows(rows);
  }

  std::size_t retry_failed(std::span<const std::int64_t> ids) override {
    if (ids.empty()) return 0;
    auto txn = db_.begin();
    auto n = txn.execute(
        "UPDATE natspubsub_outbox SET status = 'pending', attempts = 0, next_attempt_at = $2 "
        "WHERE status = 'failed' AND id IN (SELECT value FROM json_each($1))",
        {ids_json(ids), unix_ms_now()});
    txn.commit();
    return static_cast<std::size_t>(n);
  }

  std::size_t retry_all_failed() override {
    auto txn = db_.begin();
    auto n = txn.execute(
        "UPDATE natspubsub_outbox SET status = 'pending', attempts = 0, next_attempt_at = $1 WHERE status = 'failed'",
        {unix_ms_now()});
    txn.commit();
    return static_cast<std::size_t>(n);
  }

 private:
  // $1 relay, $2 ids (JSON array), $3 the statement's value; only rows still held by the relay.
  // (Relay claims: `ids` are no longer owned once it committed.)
  std::size_t update_held(std::string_view sql, std::string_view relay_id, std::span<const std::int64_t> ids,
                          std::int64_t value) {
    if (ids.empty()) return 0;
    auto txn = db_.begin();
    auto n = txn.execute(std::string(sql) + std::string(held()), {relay_id, ids_json(ids), value});
    txn.commit();
    settle(ids);
    return static_cast<std::size_t>(n);
  }

  // Lease claims made through make_outbox_store (any program, not only the relay) hold the
  // relay lock shared from their first claim on: a relay with read claims cannot start beside
  // them, nor they beside it.
  void lock_shared() {
    if (!lock_) lock_ = std::make_unique<RelayLock>(db_, false);
  }

  [[nodiscard]] std::string_view held() const noexcept { return claims_ == Claims::relay ? kOwned : kHeld; }
  // Relay claims: the outcome of `ids` is in the database; claims may take them again.
  void settle(std::span<const std::int64_t> ids) {
    for (auto id : ids) owned_.erase(id);
  }

  static std::vector<OutboxRow> to_sorted_rows(const std::vector<store::Row>& rows) {
    std::vector<OutboxRow> out;
    out.reserve(rows.size());
    for (const auto& row : rows) out.push_back(outbox_row_from(row));
    // RETURNING yields rows in no particular order; the relay publishes in id order.
    std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.id < b.id; });
    return out;
  }

  store::SqliteDatabase& db_;
  Claims claims_ = Claims::lease;
  std::unique_ptr<RelayLock> lock_;
  std::set<std::int64_t> owned_;  // relay claims: returned by a claim, outcome not yet written
  std::chrono::steady_clock::time_point next_full_scan_{};
};

}  // namespace

std::unique_ptr<OutboxStore> make_sqlite_outbox_store(store::SqliteDatabase& db) {
  return std::make_unique<SqliteOutboxStore>(db);
}

std::unique_ptr<OutboxStore> make_sqlite_relay_store(store::SqliteDatabase& db, bool relay_claims) {
  return std::make_unique<SqliteOutboxStore>(
      db, relay_claims ? SqliteOutboxStore::Claims::relay : SqliteOutboxStore::Claims::lease);
}

}  // namespace natspubsub::detail
