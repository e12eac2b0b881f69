// The outbox store on PostgreSQL. Every operation is one short READ COMMITTED transaction.
//
// Per-key order with several relays: the claim statement alone is not enough under concurrency,
// because two claims running at once would each judge "is an earlier row of this key still
// unsent and not claimable?" from their own snapshot, in which the other's claim is invisible.
// So each claim first takes a transaction-scoped advisory lock (kClaimLock): claims run one at a
// time, and each one's statement snapshot (taken after the lock) contains every earlier claim.
// The lock is held for one statement, not while publishing, so relays still publish in parallel.
// The other transitions that can turn a claimable row into a blocking one (mark_failed: back to
// a later next_attempt_at or failed; release and renew_lease on a row whose lease had expired;
// retry_failed for symmetry) take the same lock. mark_sent, delete_sent and cleanup only ever
// unblock successors, so they do not. FOR UPDATE SKIP LOCKED keeps a claim from waiting on a row
// a mark is updating at that moment.
#include <natspubsub/store/postgres.hpp>

#include <algorithm>

#include <pqxx/transaction>

#include "store/outbox_internal.hpp"
#include "store/postgres_exec.hpp"
#include "store/postgres_outbox_shared.hpp"

namespace natspubsub::detail {

namespace {

// The single-bigint advisory lock serialising claims.
constexpr std::int64_t kClaimLock = kOutboxClaimLock;

constexpr std::string_view kColumns =
    "id, event_id, subject, payload, headers::text, partition_key, status, attempts, last_error, "
    "(extract(epoch FROM next_attempt_at) * 1000)::bigint, (extract(epoch FROM created_at) * 1000)::bigint";

// $1 relay, $2 batch size, $3 lease (ms), $4 largest id to take, $5 window, $6 a relay whose rows
// are never taken even with their lease ended (NULL: none). See OutboxStore for the per-key rule.
//
// $6 is the claiming relay itself when it claims ahead, while its previous batch may still be
// publishing: if that batch outlived its lease, taking its rows back under the same relay id
// would let the two batches' marks and releases mix up (a row published twice, or after a
// later row of its key). Its rows then count as held, for the row and for the rows behind it.
//
// The window: a claim looks only at the first $5 unsent rows in id order (`bound`) that could be
// claimable now or soon: rows not due yet (backoff, scheduled later) and rows another relay holds
// under a live lease are left out, and so are keys waiting behind a long-lived blocker (a failed
// row, or one in backoff), which natspubsub_outbox_blocked_idx finds cheaply. Without the
// window, a claim while another relay's batch holds the earliest row of every key (100 hot keys,
// 5 rows each in a batch of 500) tested every one of 200,000 later rows and found none
// claimable, for 42 s, holding the claim lock. Without leaving those rows out, a key with more
// due rows than the window behind a failed row, or more rows in backoff than the window, would
// fill it and starve every later row for as long as they last. What can still fill the window
// is rows waiting behind a row another relay is publishing, which ends within its lease.
// Leaving a row out costs a step of the index walk: the walk is as long as the rows in backoff,
// held, or behind a long-lived blocker below the window's end.
constexpr std::string_view kClaim = R"sql(
WITH bound AS (
  SELECT max(w.id) AS id FROM (
    SELECT o.id FROM natspubsub_outbox AS o
    WHERE o.status IN ('pending', 'publishing') AND o.id <= $4
      AND ((o.status = 'pending' AND o.next_attempt_at <= now())
           OR (o.status = 'publishing' AND COALESCE(o.locked_until, '-infinity') < now()
               AND o.locked_by IS DISTINCT FROM $6))
      AND (o.partition_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM natspubsub_outbox AS b
            WHERE b.partition_key = o.partition_key AND b.id < o.id
              AND (b.status = 'failed' OR (b.status = 'pending' AND (b.attempts > 0 OR b.next_attempt_at > b.created_at)))
              AND NOT (b.status = 'pending' AND b.next_attempt_at <= now())))
    ORDER BY o.id
    LIMIT $5) AS w),
candidates AS (
  SELECT o.id FROM natspubsub_outbox AS o
  WHERE o.status IN ('pending', 'publishing') AND o.id <= $4 AND o.id <= (SELECT id FROM bound)
    AND ((o.status = 'pending' AND o.next_attempt_at <= now())
         OR (o.status = 'publishing' AND COALESCE(o.locked_until, '-infinity') < now()
             AND o.locked_by IS DISTINCT FROM $6))
    AND (o.partition_key IS NULL OR NOT EXISTS (
          SELECT 1 FROM natspubsub_outbox AS e
          WHERE e.partition_key = o.partition_key AND e.id < o.id AND e.status <> 'sent'
            AND NOT ((e.status = 'pending' AND e.next_attempt_at <= now())
                     OR (e.status = 'publishing' AND COALESCE(e.locked_until, '-infinity') < now()
                         AND e.locked_by IS DISTINCT FROM $6))))
  ORDER BY o.id
  LIMIT $2
  FOR UPDATE SKIP LOCKED)
UPDATE natspubsub_outbox AS t
SET status = 'publishing', locked_by = $1,
    locked_until = now() + make_interval(secs => $3::double precision / 1000)
FROM candidates AS c
WHERE t.id = c.id
RETURNING t.id, t.event_id, t.subject, t.payload, t.headers::text, t.partition_key, t.status, t.attempts,
          t.last_error, (extract(epoch FROM t.next_attempt_at) * 1000)::bigint,
          (extract(epoch FROM t.created_at) * 1000)::bigint)sql";

// Rows a claim looks at, per row it may take (see kClaim).
constexpr std::int64_t kWindowPerRow = 4;

constexpr std::string_view kHeld = " AND status = 'publishing' AND locked_by = $1";
// $1 relay, $2 ids (a bigint[] literal); followed by kHeld.
constexpr std::string_view kMarkSent =
    "UPDATE natspubsub_outbox SET status = 'sent', sent_at = now(), locked_by = NULL, locked_until = NULL "
    "WHERE id = ANY($2::bigint[])";
constexpr std::string_view kDeleteSent = "DELETE FROM natspubsub_outbox WHERE id = ANY($2::bigint[])";

class PostgresOutboxStore final : public OutboxStore {
 public:
  explicit PostgresOutboxStore(store::PostgresDatabase& db) : db_(db) {}

  std::vector<OutboxRow> claim(std::string_view relay_id, std::size_t batch_size, std::chrono::milliseconds lease,
                               std::int64_t up_to_id) override {
    return claim_after(relay_id, {}, false, batch_size, lease, up_to_id, false);
  }

  std::vector<OutboxRow> mark_sent_and_claim(std::string_view relay_id, std::span<const std::int64_t> sent_ids,
                                             bool delete_sent, std::size_t batch_size,
                                             std::chrono::milliseconds lease, std::int64_t up_to_id) override {
    return claim_after(relay_id, sent_ids, delete_sent, batch_size, lease, up_to_id, true);
  }

  std::size_t renew_lease(std::string_view relay_id, std::span<const std::int64_t> ids,
                          std::chrono::milliseconds lease) override {
    return update_held("renewing outbox leases", true,
                       "UPDATE natspubsub_outbox SET locked_until = now() + make_interval(secs => "
                       "$3::double precision / 1000) WHERE id = ANY($2::bigint[])",
                       relay_id, ids, lease.count());
  }

 private:
  std::vector<OutboxRow> claim_after(std::string_view relay_id, std::span<const std::int64_t> sent_ids,
                                     bool delete_sent, std::size_t batch_size, std::chrono::milliseconds lease,
                                     std::int64_t up_to_id, bool ahead) {
    if (batch_size == 0) {
      if (!sent_ids.empty()) delete_sent ? this->delete_sent(relay_id, sent_ids) : mark_sent(relay_id, sent_ids);
      return {};
    }
    auto rows = transact("claiming outbox rows", /*claim_lock=*/true, [&](pqxx::work& txn) {
      if (!sent_ids.empty())
        exec(txn, std::string(delete_sent ? kDeleteSent : kMarkSent) + std::string(kHeld),
             {relay_id, pg_array(sent_ids)});
      // A backlog builds up exactly when the table's statistics are stale (a burst after an
      // ANALYZE that saw almost only sent rows, or a table never analyzed): the planner then
      // estimates a handful of claimable rows and picks a bitmap scan of *all* claimable rows
      // plus a sort, per claim, which makes draining a backlog quadratic (100,000 rows: 84 ms
      // per claim of 500 instead of 20). Without sorts the only plan left for ORDER BY id LIMIT
      // is walking claim_idx in id order, which stops after batch_size rows. SET LOCAL: this
      // transaction only.
      // Per-key rule with hot keys (100 keys of 1,000 rows): the NOT EXISTS probe walks the
      // key's entries in natspubsub_outbox_partition_idx, which keeps entries of rows already
      // sent until vacuum. A bitmap scan visits the heap for every one of them on every claim
      // (363 entries and 176,000 heap blocks per claim of 500, 80,000 rows pending); a plain
      // index scan marks dead entries as such the first time and skips them afterwards. And the
      // statement's estimated cost is far above jit_above_cost, so PostgreSQL compiled it with
      // JIT on every claim: 490 ms of a 750 ms claim. Without both: 30-36 ms. One round trip for all three.
      txn.exec("SET LOCAL enable_sort = off; SET LOCAL enable_bitmapscan = off; SET LOCAL jit = off");
      const auto batch = static_cast<std::int64_t>(batch_size);
      return exec(txn, kClaim,
                  {relay_id, batch, lease.count(), up_to_id, batch * kWindowPerRow,
                   ahead ? store::Value(relay_id) : store::Value()});
    });
    return to_sorted_rows(rows);
  }

 public:

  std::size_t mark_sent(std::string_view relay_id, std::span<const std::int64_t> ids) override {
    return update_held("marking outbox rows sent", false, kMarkSent, relay_id, ids, std::nullopt);
  }

  std::size_t delete_sent(std::string_view relay_id, std::span<const std::int64_t> ids) override {
    return update_held("deleting sent outbox rows", false, kDeleteSent, relay_id, ids, std::nullopt);
  }

  OutboxFailResult mark_failed(std::string_view relay_id, std::span<const OutboxFailure> failures,
                               int max_attempts) override {
    OutboxFailResult result;
    if (failures.empty()) return result;
    max_attempts = std::max(max_attempts, 1);
    auto rows = transact("recording failed publishes", true, [&](pqxx::work& txn) {
      return exec(txn, R"sql(
UPDATE natspubsub_outbox AS t
SET attempts = t.attempts + 1,
    last_error = f.error,
    status = CASE WHEN t.attempts + 1 >= $3 THEN 'failed' ELSE 'pending' END,
    next_attempt_at = now() + make_interval(secs => f.delay_ms::double precision / 1000),
    locked_by = NULL,
    locked_until = NULL
FROM jsonb_to_recordset($2::jsonb) AS f(id bigint, error text, delay_ms bigint)
WHERE t.id = f.id AND t.status = 'publishing' AND t.locked_by = $1
RETURNING t.id, t.status)sql",
                  {relay_id, failures_json(failures), max_attempts});
    });
    for (const auto& row : rows) {
      (row.as_text(1) == "failed" ? result.failed : result.rescheduled).push_back(row.as_int(0));
    }
    std::sort(result.failed.begin(), result.failed.end());
    std::sort(result.rescheduled.begin(), result.rescheduled.end());
    return result;
  }

  std::size_t release(std::string_view relay_id, std::span<const std::int64_t> ids) override {
    return update_held("releasing outbox rows", true,
                       "UPDATE natspubsub_outbox SET status = 'pending', next_attempt_at = LEAST(next_attempt_at, now()), "
                       "locked_by = NULL, "
                       "locked_until = NULL WHERE id = ANY($2::bigint[])",
                       relay_id, ids, std::nullopt);
  }

  std::size_t cleanup_sent(std::chrono::milliseconds older_than, std::size_t batch_limit) override {
    if (batch_limit == 0) return 0;
    auto rows = transact("cleaning up sent outbox rows", false, [&](pqxx::work& txn) {
      return exec(txn,
                  "WITH doomed AS ("
                  " SELECT id FROM natspubsub_outbox WHERE status = 'sent'"
                  " AND sent_at < now() - make_interval(secs => $1::double precision / 1000)"
                  " ORDER BY sent_at LIMIT $2)"
                  " DELETE FROM natspubsub_outbox AS t USING doomed WHERE t.id = doomed.id RETURNING t.id",
                  {older_than.count(), static_cast<std::int64_t>(batch_limit)});
    });
    return rows.size();
  }

  OutboxStats stats() override {
    auto rows = transact("reading outbox stats", false, [&](pqxx::work& txn) {
      return exec(txn,
                  "SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'publishing'),"
                  " count(*) FILTER (WHERE status = 'sent'), count(*) FILTER (WHERE status = 'failed'),"
                  " (extract(epoch FROM now() - min(created_at) FILTER (WHERE status IN ('pending', 'publishing')))"
                  " * 1000)::bigint,"
                  " (extract(epoch FROM min(next_attempt_at) FILTER (WHERE status = 'pending') - now()) * 1000)::bigint,"
                  " COALESCE(max(id), 0)"
                  " FROM natspubsub_outbox");
    });
    OutboxStats stats;
    const auto& row = rows.at(0);
    stats.pending = row.as_int(0);
    stats.publishing = row.as_int(1);
    stats.sent = row.as_int(2);
    stats.failed = row.as_int(3);
    if (!row.is_null(4)) stats.oldest_unsent_age = std::chrono::milliseconds(std::max<std::int64_t>(0, row.as_int(4)));
    if (!row.is_null(5)) stats.next_due_in = std::chrono::milliseconds(std::max<std::int64_t>(0, row.as_int(5)));
    stats.max_id = row.as_int(6);
    return stats;
  }

  std::vector<OutboxRow> list_failed(std::size_t limit) override {
    auto rows = transact("listing failed outbox rows", false, [&](pqxx::work& txn) {
      return exec(txn,
                  "SELECT " + std::string(kColumns) +
                      " FROM natspubsub_outbox WHERE status = 'failed' ORDER BY id LIMIT $1",
                  {static_cast<std::int64_t>(limit)});
    });
    return to_sorted_rows(rows);
  }

  std::size_t retry_failed(std::span<const std::int64_t> ids) override {
    if (ids.empty()) return 0;
    auto rows = transact("retrying failed outbox rows", true, [&](pqxx::work& txn) {
      return exec(txn,
                  "UPDATE natspubsub_outbox SET status = 'pending', attempts = 0, next_attempt_at = now() "
                  "WHERE status = 'failed' AND id = ANY($1::bigint[]) RETURNING id",
                  {pg_array(ids)});
    });
    return rows.size();
  }

  std::size_t retry_all_failed() override {
    auto rows = transact("retrying failed outbox rows", true, [&](pqxx::work& txn) {
      return exec(txn,
                  "UPDATE natspubsub_outbox SET status = 'pending', attempts = 0, next_attempt_at = now() "
                  "WHERE status = 'failed' RETURNING id");
    });
    return rows.size();
  }

 private:
  std::vector<store::Row> exec(pqxx::work& txn, std::string_view sql, const store::Params& params = {}) {
    return store::detail::to_rows(store::detail::pg_exec(txn, sql, params, &db_.url()));
  }

  /// One transaction around `fn`, optionally holding the claim lock; errors typed and scrubbed.
  template <typename F>
  std::vector<store::Row> transact(std::string_view what, bool claim_lock, F&& fn) {
    try {
      pqxx::work txn(db_.connection());
      if (claim_lock) txn.exec_params("SELECT pg_advisory_xact_lock($1)", kClaimLock);
      auto rows = fn(txn);
      txn.commit();
      return rows;
    } catch (...) {
      store::rethrow_postgres_error(what, &db_.url());
    }
  }

  // $1 relay, $2 ids (bigint[]), $3 the statement's value (if any); only rows still held.
  std::size_t update_held(std::string_view what, bool claim_lock, std::string_view sql, std::string_view relay_id,
                          std::span<const std::int64_t> ids, std::optional<std::int64_t> value) {
    if (ids.empty()) return 0;
    store::Params params{relay_id, pg_array(ids)};
    if (value) params.emplace_back(*value);
    auto rows = transact(what, claim_lock, [&](pqxx::work& txn) {
      return exec(txn, std::string(sql) + std::string(kHeld) + " RETURNING 1", params);
    });
    return rows.size();
  }

  static std::string pg_array(std::span<const std::int64_t> ids) { return pg_bigint_array(ids); }

  static std::vector<OutboxRow> to_sorted_rows(const std::vector<store::Row>& rows) {
    std::vector<OutboxRow> out;
    out.reserve(rows.size());
    for (const auto& row : rows) out.push_back(outbox_row_from(row));
    std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.id < b.id; });
    return out;
  }

  store::PostgresDatabase& db_;
};

}  // namespace

std::unique_ptr<OutboxStore> make_postgres_outbox_store(store::PostgresDatabase& db) {
  return std::make_unique<PostgresOutboxStore>(db);
}

}  // namespace natspubsub::detail
