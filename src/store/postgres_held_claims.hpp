#pragma once
// The PostgreSQL relay's claims (not installed): a batch is held by row locks in a transaction
// left open while it is published, and its outcome is written in that transaction at the end.
// Each row is written once (sent, deleted, or its failure), instead of twice (publishing with a
// lease, then sent) in two transactions: on a freshly filled outbox, 12 batches of 500 took
// 720 ms of database time with the lease claim and mark, 197 ms held.
//
//   HeldClaims claims(db.url(), Millis{30000});
//   auto batch = claims.claim(500, up_to_id);   // rows locked, nothing written
//   // publish batch->rows() in order, then:
//   batch->finish({.sent = acked_ids, .failures = failures});   // one transaction: COMMIT
//   // or batch->abandon(): ROLLBACK, every row as it was
//
// Per-key order, the rule: a relay publishes a keyed row only while it holds the lock of every
// earlier unsent row of its key, after the claim statement. A row another relay holds looks
// pending and due to everybody else (its lock is invisible to a query), so the claim statement
// alone would take the rows behind it: after locking its candidates, a claim reads the unsent
// rows of their keys (a new snapshot, after the locks) and keeps of each key only the run that
// starts at the key's first unsent row and has no gap. A row it locked and does not keep stays
// locked until its transaction ends, unpublished. No claim lock is needed: what one claim
// decides rests on locks it holds, not on a snapshot another claim could change.
//
// A relay that dies takes its locks with it: PostgreSQL rolls its transaction back when the
// connection ends, and the rows are claimable again at once with nothing counted. A relay cut
// off from PostgreSQL is cut off by the server after `lease` idle in the transaction
// (idle_in_transaction_session_timeout, set for the transaction: it holds behind a pooler in
// transaction mode too), the same bound as a lease; a claim statement is bounded by the lease too.
//
// Relays with lease claims (RelayOptions::hold_claims false, or a build from before held claims)
// cannot see these locks and would take the rows behind a held row. So a held batch holds the
// lease claims' advisory lock shared while it is open; a lease claim takes it exclusive, and
// waits (older relays stall, they do not break order) while held batches are open. Rows a lease
// relay left in `publishing` are treated as a lease claim would: held while the lease lasts.
//
// Test: tests/postgres_held_claims_test.cpp.
#include <chrono>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <natspubsub/outbox.hpp>
#include <natspubsub/store/postgres.hpp>

namespace natspubsub::detail {

/// What became of a held batch, written when it ends. Rows in none of the lists are left as
/// they were (pending, nothing counted): given back unpublished.
struct HeldOutcome {
  std::vector<std::int64_t> sent;      ///< acknowledged: sent (or deleted with delete_sent)
  bool delete_sent = false;
  std::vector<OutboxFailure> failures;  ///< attempts + 1; failed at max_attempts
  int max_attempts = 1;
  std::vector<OutboxFailure> refused;   ///< cannot succeed: failed now
};

class HeldClaims;

/// One claimed batch: its rows are locked in an open transaction on a connection of its own.
/// Destroying it unfinished abandons it. One thread at a time.
class HeldBatch {
 public:
  HeldBatch(const HeldBatch&) = delete;
  HeldBatch& operator=(const HeldBatch&) = delete;
  ~HeldBatch();

  [[nodiscard]] const std::vector<OutboxRow>& rows() const noexcept { return rows_; }
  [[nodiscard]] std::vector<OutboxRow>& rows() noexcept { return rows_; }
  /// Empty although claimable-looking rows were there: every one of them was behind a row
  /// another batch holds (hot keys). Claiming again at once would find the same, and its
  /// momentary locks would keep the other batch's next claim off those rows.
  [[nodiscard]] bool behind_others() const noexcept { return behind_others_; }
  /// Where a later claim may start (`after_id`) without passing over a row this claim found and
  /// did not keep: one below the first such row, or the last row kept (the smallest id when it
  /// found nothing).
  [[nodiscard]] std::int64_t resume_after() const noexcept { return resume_after_; }
  /// Writes `outcome` and commits. Throws DatabaseError (the transaction is then rolled back:
  /// every row as it was, including those published).
  OutboxFailResult finish(const HeldOutcome& outcome);
  /// Rolls back: every row as it was. Never throws.
  void abandon() noexcept;

 private:
  friend class HeldClaims;
  struct Session;
  HeldBatch(HeldClaims& owner, std::unique_ptr<Session> session, std::vector<OutboxRow> rows);
  void give_back(bool reusable) noexcept;

  HeldClaims* owner_;
  bool behind_others_ = false;
  std::int64_t resume_after_ = std::numeric_limits<std::int64_t>::min();
  std::unique_ptr<Session> session_;
  std::vector<OutboxRow> rows_;
};

/// Claims held batches; keeps the connections of finished batches for the next ones. Thread-safe.
class HeldClaims {
 public:
  /// `url`: the outbox's database. `lease`: how long a batch may take (see above).
  HeldClaims(store::DatabaseUrl url, std::chrono::milliseconds lease);
  ~HeldClaims();

  /// Locks up to `batch_size` claimable rows with `after_id` < id <= `up_to_id` (per-key rule
  /// above) and returns them in id order; an empty batch when there are none (its transaction
  /// is over). `after_id` only narrows the scan (a claim made while this relay's own batches hold
  /// the rows before it need not step over them): the per-key rule holds whatever it is.
  /// Throws DatabaseError.
  [[nodiscard]] std::unique_ptr<HeldBatch> claim(std::size_t batch_size, std::int64_t up_to_id,
                                                 std::int64_t after_id = std::numeric_limits<std::int64_t>::min());

 private:
  friend class HeldBatch;
  std::unique_ptr<HeldBatch::Session> take_session();
  void put_back(std::unique_ptr<HeldBatch::Session> session);

  const store::DatabaseUrl url_;
  const std::chrono::milliseconds lease_;
  std::mutex mutex_;
  std::vector<std::unique_ptr<HeldBatch::Session>> idle_;
};

}  // namespace natspubsub::detail
