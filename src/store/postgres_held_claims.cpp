// Held claims on PostgreSQL: see postgres_held_claims.hpp for the rule and why.
#include "store/postgres_held_claims.hpp"

#include <algorithm>
#include <map>
#include <set>

#include <pqxx/transaction>

#include "store/outbox_internal.hpp"
#include "store/postgres_exec.hpp"
#include "store/postgres_outbox_shared.hpp"

namespace natspubsub::detail {

namespace {

// $1 batch size, $2 largest id to take, $3 the id to start after. The candidates, locked as
// they are found (FOR NO KEY
// UPDATE SKIP LOCKED before LIMIT: a row another relay holds is passed over at the cost of a
// look). Claimable: pending and due, or left in `publishing` by a lease claim whose lease ended.
// The NOT EXISTS is the lease claim's per-key rule (postgres_outbox.cpp): it leaves out rows
// behind a failed row, a row in backoff or a live lease; rows behind a row another relay holds
// pass it (the lock is invisible), and kHeads drops them after.
//
// No window (the lease claim's `bound`): rows other relays hold are `pending` and due, so with
// three relays claiming ahead the first 4 x batch rows could all be held and a third relay would
// find nothing for as long as the others run. Without it the statement stops at LIMIT: behind
// other relays' batches it locks up to batch_size later rows of their keys, which kHeads drops.
constexpr std::string_view kCandidates = R"sql(
SELECT o.id, o.event_id, o.subject, o.payload, o.headers::text, o.partition_key, o.status, o.attempts, o.last_error,
       (extract(epoch FROM o.next_attempt_at) * 1000)::bigint, (extract(epoch FROM o.created_at) * 1000)::bigint
FROM natspubsub_outbox AS o
WHERE o.status IN ('pending', 'publishing') AND o.id <= $2 AND o.id > $3
  AND ((o.status = 'pending' AND o.next_attempt_at <= now())
       OR (o.status = 'publishing' AND COALESCE(o.locked_until, '-infinity') < now()))
  AND (o.partition_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM natspubsub_outbox AS e
        WHERE e.partition_key = o.partition_key AND e.id < o.id AND e.status <> 'sent'
          AND NOT ((e.status = 'pending' AND e.next_attempt_at <= now())
                   OR (e.status = 'publishing' AND COALESCE(e.locked_until, '-infinity') < now()))))
ORDER BY o.id
LIMIT $1
FOR NO KEY UPDATE OF o SKIP LOCKED)sql";

// $1 ids (bigint[]) of keyed candidates, $2 largest id: every unsent row of their keys up to it,
// read after the candidates were locked. (The keys travel as ids: a text[] literal built here
// would depend on the client encoding.)
constexpr std::string_view kHeads =
    "SELECT partition_key, id FROM natspubsub_outbox "
    "WHERE partition_key IN (SELECT partition_key FROM natspubsub_outbox WHERE id = ANY($1::bigint[])) "
    "AND status <> 'sent' AND id <= $2 ORDER BY partition_key, id";

// $1 ids (bigint[]): locks them again if they are still claimable (see claim()).
constexpr std::string_view kRelock = R"sql(
SELECT o.id FROM natspubsub_outbox AS o
WHERE o.id = ANY($1::bigint[])
  AND ((o.status = 'pending' AND o.next_attempt_at <= now())
       OR (o.status = 'publishing' AND COALESCE(o.locked_until, '-infinity') < now()))
FOR NO KEY UPDATE OF o SKIP LOCKED)sql";

// The lease claims' advisory lock (postgres_outbox.cpp, kClaimLock). A held batch takes it
// shared for as long as it is open: a relay with lease claims (an older build during an upgrade,
// or --lease-claims) takes it exclusive for each claim and transition, so it waits while held
// batches are open instead of claiming the rows behind a held row it cannot see.
constexpr std::int64_t kClaimLock = kOutboxClaimLock;

std::string pg_array(std::span<const std::int64_t> ids) { return pg_bigint_array(ids); }

std::string failures_with_max_json(const HeldOutcome& outcome) {
  auto array = nlohmann::json::array();
  auto add = [&](const OutboxFailure& f, int max_attempts) {
    array.push_back({{"id", f.id},
                     {"error", bounded_error(f.error)},
                     {"delay_ms", std::max<std::int64_t>(0, f.retry_delay.count())},
                     {"max", std::max(1, max_attempts)}});
  };
  for (const auto& f : outcome.failures) add(f, outcome.max_attempts);
  for (const auto& f : outcome.refused) add(f, 1);
  return array.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace

struct HeldBatch::Session {
  std::unique_ptr<store::PostgresDatabase> db;
  std::unique_ptr<pqxx::work> txn;
  std::chrono::steady_clock::time_point idle_since;  // in the pool since
};

namespace {
// A pooled connection unused for longer is closed rather than reused: a server's
// idle_session_timeout, or a firewall dropping quiet connections, may have ended it meanwhile.
constexpr auto kMaxIdle = std::chrono::seconds(30);
}  // namespace

HeldClaims::HeldClaims(store::DatabaseUrl url, std::chrono::milliseconds lease)
    : url_(std::move(url)), lease_(lease) {}

HeldClaims::~HeldClaims() = default;

std::unique_ptr<HeldBatch::Session> HeldClaims::take_session() {
  std::vector<std::unique_ptr<HeldBatch::Session>> stale;  // closed outside the mutex
  std::unique_ptr<HeldBatch::Session> s;
  {
    std::lock_guard lock(mutex_);
    const auto now = std::chrono::steady_clock::now();
    while (!idle_.empty() && !s) {
      auto candidate = std::move(idle_.back());
      idle_.pop_back();
      if (now - candidate->idle_since > kMaxIdle)
        stale.push_back(std::move(candidate));
      else
        s = std::move(candidate);
    }
  }
  if (s) return s;
  s = std::make_unique<HeldBatch::Session>();
  s->db = std::make_unique<store::PostgresDatabase>(url_);
  return s;
}

void HeldClaims::put_back(std::unique_ptr<HeldBatch::Session> session) {
  session->idle_since = std::chrono::steady_clock::now();
  std::lock_guard lock(mutex_);
  idle_.push_back(std::move(session));
}

std::unique_ptr<HeldBatch> HeldClaims::claim(std::size_t batch_size, std::int64_t up_to_id, std::int64_t after_id) {
  auto session = take_session();
  std::vector<OutboxRow> kept;
  std::vector<std::int64_t> locked_ids;  // every candidate the statement locked
  bool found_any = false;
  try {
    session->txn = std::make_unique<pqxx::work>(session->db->connection());
    auto& txn = *session->txn;
    // Plans without sorts, bitmap scans or JIT: see the lease claim (postgres_outbox.cpp).
    // A relay that stops talking to PostgreSQL in the middle of a batch (hung, cut off) loses its
    // locks after the lease, as a lease claim would; so does a statement that runs that long.
    // The shared claim lock: see kClaimLock. The savepoint: locks taken after it go with a
    // rollback to it (below).
    const auto lease_ms = std::to_string(std::max<std::int64_t>(1, lease_.count()));
    txn.exec("SET LOCAL enable_sort = off; SET LOCAL enable_bitmapscan = off; SET LOCAL jit = off; "
             "SET LOCAL idle_in_transaction_session_timeout = " + lease_ms +
             "; SET LOCAL statement_timeout = " + lease_ms +
             "; SELECT pg_advisory_xact_lock_shared(" + std::to_string(kClaimLock) +
             "); SAVEPOINT natspubsub_candidates");
    const auto batch = static_cast<std::int64_t>(std::max<std::size_t>(1, batch_size));
    auto rows = store::detail::to_rows(
        store::detail::pg_exec(txn, kCandidates, {batch, up_to_id, after_id}, &session->db->url()));
    std::vector<OutboxRow> locked;
    locked.reserve(rows.size());
    for (const auto& row : rows) locked.push_back(outbox_row_from(row));
    found_any = !locked.empty();
    for (const auto& row : locked) locked_ids.push_back(row.id);
    std::sort(locked.begin(), locked.end(), [](const auto& a, const auto& b) { return a.id < b.id; });

    // Keep of each key only the run from its first unsent row on, without a gap.
    std::vector<std::int64_t> keyed;
    std::int64_t max_keyed = 0;
    for (const auto& row : locked) {
      if (row.partition_key) {
        keyed.push_back(row.id);
        max_keyed = std::max(max_keyed, row.id);
      }
    }
    std::map<std::string, std::vector<std::int64_t>> unsent;  // key -> unsent ids up to max_keyed, ascending
    if (!keyed.empty()) {
      auto heads = store::detail::to_rows(
          store::detail::pg_exec(txn, kHeads, {pg_array(keyed), max_keyed}, &session->db->url()));
      for (const auto& h : heads) unsent[h.as_text(0)].push_back(h.as_int(1));
    }
    std::map<std::string, std::size_t> next;  // key -> index in unsent[key] the next kept row must be
    std::set<std::string> broken;
    kept.reserve(locked.size());
    for (auto& row : locked) {
      if (!row.partition_key) {
        kept.push_back(std::move(row));
        continue;
      }
      const auto& key = *row.partition_key;
      if (broken.count(key) > 0) continue;
      auto& i = next[key];
      const auto& ids = unsent[key];
      if (i < ids.size() && ids[i] == row.id) {
        ++i;
        kept.push_back(std::move(row));
      } else {
        broken.insert(key);  // an earlier unsent row of the key is not ours: held, or changed since
      }
    }
    if (kept.size() < locked.size()) {
      // Rows locked and not kept would keep others from them for as long as this batch lasts
      // (with hot keys, every later row of the keys another relay holds): let them all go, and
      // lock again only what is kept. A kept row someone took meanwhile ends its key's run, and
      // the rows after it are let go in another pass, until what is locked is what is kept.
      txn.exec("ROLLBACK TO SAVEPOINT natspubsub_candidates");
      bool settled = kept.empty();
      for (int pass = 0; pass < 4 && !settled; ++pass) {
        std::vector<std::int64_t> ids;
        ids.reserve(kept.size());
        for (const auto& row : kept) ids.push_back(row.id);
        auto relocked = store::detail::to_rows(store::detail::pg_exec(txn, kRelock, {pg_array(ids)}, &session->db->url()));
        std::set<std::int64_t> have;
        for (const auto& r : relocked) have.insert(r.as_int(0));
        std::set<std::string> ended;
        std::vector<OutboxRow> still;
        still.reserve(kept.size());
        for (auto& row : kept) {
          if (row.partition_key && ended.count(*row.partition_key) > 0) continue;
          if (have.count(row.id) == 0) {
            if (row.partition_key) ended.insert(*row.partition_key);
            continue;
          }
          still.push_back(std::move(row));
        }
        settled = still.size() == have.size();  // every row locked is kept
        if (!settled) txn.exec("ROLLBACK TO SAVEPOINT natspubsub_candidates");
        kept = std::move(still);
        if (kept.empty()) settled = true;
      }
      if (!settled) kept.clear();  // still moving after 4 passes: nothing this time
    }
  } catch (...) {
    session->txn.reset();  // rolls back
    store::rethrow_postgres_error("claiming outbox rows", &url_);
  }
  // A row found and not kept (behind another batch's row, behind a row of this relay's batch in
  // flight) must not be passed over by a claim ahead that starts after it.
  std::int64_t first_dropped = std::numeric_limits<std::int64_t>::max();
  {
    std::set<std::int64_t> kept_ids;
    for (const auto& row : kept) kept_ids.insert(row.id);
    for (const auto id : locked_ids)
      if (kept_ids.count(id) == 0) first_dropped = std::min(first_dropped, id);
  }
  const std::int64_t resume = first_dropped != std::numeric_limits<std::int64_t>::max()
                                  ? first_dropped - 1
                                  : (kept.empty() ? std::numeric_limits<std::int64_t>::min() : kept.back().id);
  if (kept.empty()) {
    // Nothing to publish: end the transaction now (its locks, if any, with it).
    try {
      session->txn->commit();
      session->txn.reset();
      put_back(std::move(session));
    } catch (...) {
    }
    std::unique_ptr<HeldBatch> empty(new HeldBatch(*this, nullptr, {}));
    empty->behind_others_ = found_any;
    empty->resume_after_ = resume;
    return empty;
  }
  std::unique_ptr<HeldBatch> held(new HeldBatch(*this, std::move(session), std::move(kept)));
  held->resume_after_ = resume;
  return held;
}

HeldBatch::HeldBatch(HeldClaims& owner, std::unique_ptr<Session> session, std::vector<OutboxRow> rows)
    : owner_(&owner), session_(std::move(session)), rows_(std::move(rows)) {}

HeldBatch::~HeldBatch() { abandon(); }

void HeldBatch::give_back(bool reusable) noexcept {
  if (!session_) return;
  session_->txn.reset();
  if (reusable && session_->db->connection().is_open()) {
    try {
      owner_->put_back(std::move(session_));
    } catch (...) {
    }
  }
  session_.reset();
}

void HeldBatch::abandon() noexcept {
  if (!session_) return;
  bool reusable = true;
  try {
    if (session_->txn) session_->txn->abort();
  } catch (...) {
    reusable = false;
  }
  give_back(reusable);
}

OutboxFailResult HeldBatch::finish(const HeldOutcome& outcome) {
  OutboxFailResult result;
  if (!session_) return result;
  try {
    auto& txn = *session_->txn;
    const auto* url = &session_->db->url();
    if (!outcome.sent.empty()) {
      store::detail::pg_exec(txn,
                             outcome.delete_sent
                                 ? "DELETE FROM natspubsub_outbox WHERE id = ANY($1::bigint[])"
                                 : "UPDATE natspubsub_outbox SET status = 'sent', sent_at = statement_timestamp(), locked_by = NULL, "
                                   "locked_until = NULL WHERE id = ANY($1::bigint[])",
                             {pg_array(outcome.sent)}, url);
    }
    if (!outcome.failures.empty() || !outcome.refused.empty()) {
      auto rows = store::detail::to_rows(store::detail::pg_exec(txn, R"sql(
UPDATE natspubsub_outbox AS t
SET attempts = t.attempts + 1,
    last_error = f.error,
    status = CASE WHEN t.attempts + 1 >= f.max THEN 'failed' ELSE 'pending' END,
    next_attempt_at = statement_timestamp() + make_interval(secs => f.delay_ms::double precision / 1000),
    locked_by = NULL,
    locked_until = NULL
FROM jsonb_to_recordset($1::jsonb) AS f(id bigint, error text, delay_ms bigint, max integer)
WHERE t.id = f.id
RETURNING t.id, t.status)sql",
                                                                {failures_with_max_json(outcome)}, url));
      for (const auto& row : rows) (row.as_text(1) == "failed" ? result.failed : result.rescheduled).push_back(row.as_int(0));
      std::sort(result.failed.begin(), result.failed.end());
      std::sort(result.rescheduled.begin(), result.rescheduled.end());
    }
    txn.commit();
  } catch (...) {
    give_back(false);
    store::rethrow_postgres_error("recording a published outbox batch", &owner_->url_);
  }
  give_back(true);
  return result;
}

}  // namespace natspubsub::detail
