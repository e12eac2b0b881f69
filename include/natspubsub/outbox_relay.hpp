#pragma once
// The outbox relay engine: moves committed outbox rows into JetStream.
//
//   auto db = natspubsub::store::open_database("postgresql://relay@db/orders");
//   natspubsub::Connection nats(config);
//   natspubsub::OutboxRelay relay(nats, *db);
//   std::jthread worker([&](std::stop_token stop) { relay.run(stop); });
//
// One cycle: claim a batch (leased to this relay), publish its rows asynchronously with
// Nats-Msg-Id = event_id in rounds (below), wait for the PubAcks, mark the acknowledged rows sent
// (or delete them; between rounds too, every 200 ms) and reschedule the failed ones with
// backoff. A relay killed at any point loses nothing: its rows stay leased until the lease ends
// and are then claimed again; what it had already published is dropped by JetStream's
// deduplication (same Nats-Msg-Id) if the copy arrives within the stream's duplicate window.
//
// Order: per partition key, the store only hands out a row once every earlier row of its key is
// sent (see OutboxStore), so several relays keep per-key order. Within a batch a keyed row is
// published only after the PubAck of the previous row of its key has come back: the batch goes
// out in rounds (the r-th row of every key in round r, unkeyed rows in round 0), and a key whose
// row fails (refused, no PubAck in time, lost with a dropped socket) is stopped there, its later
// rows released unpublished. A row NATS cannot carry (blank in the subject, over max_payload,
// bad headers) is failed before anything is sent. A round that could outlast the lease is not
// started; its rows are released.
//
// run() and drain() claim the next batch on a second thread while the current one publishes
// (when the lease covers two batches back to back, which the defaults do), so the database work
// overlaps the network work. The claim rule keeps that safe: rows being published are held by
// this relay, so the batch claimed ahead holds no later row of their keys. A batch claimed ahead
// that is not published (stop, NATS outage, error) is given back without an attempt.
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <stop_token>
#include <string>
#include <vector>

#include <natspubsub/config.hpp>

namespace natspubsub {

class Connection;
class OutboxStore;
namespace store {
class Database;
}  // namespace store

struct RelayOptions {
  std::string relay_id;                 ///< default: "<hostname>-<pid>-<random>"
  std::size_t batch_size = 500;         ///< rows claimed and published per cycle
  Millis poll_interval{250};            ///< wait when nothing was claimable
  Millis lease{60000};                  ///< how long a claimed row is ours before others may take it
  int max_attempts = 10;                ///< failed publishes before a row is `failed`
  std::vector<Millis> backoff{Millis{1000}, Millis{5000}, Millis{30000}, Millis{120000}, Millis{600000}};
  bool delete_sent = false;             ///< retention: delete rows once acknowledged instead of marking them sent
  Millis cleanup_after{24 * 3600 * 1000};  ///< sent rows older than this are deleted by cleanup
  std::size_t cleanup_batch = 1000;     ///< rows deleted per cleanup statement
  Millis cleanup_interval{60000};
  int publish_window = 256;             ///< messages in flight
  Millis ack_timeout{10000};
  /// PostgreSQL: a batch is held by row locks in a transaction left open while it publishes, and
  /// each row is written once, when its outcome is known (sent, deleted or failed); a relay that
  /// dies gives its rows back at once. false: lease claims (status `publishing`, locked_until),
  /// two writes per row, as every relay did before held claims. Relays of both kinds must not
  /// run on one database at the same time (a lease claim cannot see the locks): when upgrading,
  /// stop the old relays before starting new ones, or run the new ones with false until the old
  /// ones are gone.
  /// SQLite: the relay locks `<file>-relay.lock` (flock) exclusively, so it is the only relay on
  /// the file, and a claim only reads: rows stay `pending` while they publish and each is written
  /// once, with its outcome. false: lease claims, under a shared lock (several lease relays may
  /// run, none with true). Another relay holding the lock the other way: ConfigError.
  bool hold_claims = true;
};

/// A histogram of publish latencies (claim to acknowledgement), in seconds, Prometheus style.
struct PublishLatencyHistogram {
  static constexpr std::array<double, 10> kBounds{0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0};
  std::array<uint64_t, kBounds.size() + 1> counts{};  ///< last bucket: +Inf
  double sum_seconds = 0;
  uint64_t count = 0;
  void record(double seconds);
};

struct RelayStats {
  uint64_t batches = 0;
  uint64_t published = 0;       ///< acknowledged by JetStream (including duplicates)
  uint64_t duplicates = 0;      ///< acknowledged as already stored (an earlier relay had sent them)
  uint64_t retried = 0;         ///< failed publishes rescheduled with backoff
  uint64_t failed = 0;          ///< rows that reached max_attempts (status failed)
  uint64_t released = 0;        ///< rows given back without an attempt (NATS unavailable, behind a failed row of their key, lease short)
  uint64_t cleaned = 0;         ///< sent rows deleted by cleanup
  uint64_t errors = 0;          ///< cycles that failed (database or NATS trouble), retried later
  PublishLatencyHistogram publish_latency;
};

/// Borrows a Connection and a Database (both must outlive it). One relay runs on one thread.
class OutboxRelay {
 public:
  OutboxRelay(Connection& connection, store::Database& database, RelayOptions options = {});
  ~OutboxRelay();
  OutboxRelay(const OutboxRelay&) = delete;
  OutboxRelay& operator=(const OutboxRelay&) = delete;

  /// One cycle: claim, publish, mark. Returns the rows claimed (0: nothing claimable now).
  /// Throws database and NATS errors; run() catches them.
  std::size_t run_once();
  /// Cycles until a claim comes back empty, NATS is unavailable (see nats_unavailable()) or stop
  /// is requested. Only rows with id <= `up_to_id` are claimed, so a drain of what was in the
  /// outbox when it started ends while producers keep inserting. Returns rows handled.
  std::size_t drain(std::stop_token stop = {}, std::int64_t up_to_id = std::numeric_limits<std::int64_t>::max());
  /// True when the last cycle found NATS disconnected or a stream not answering (its rows were
  /// released without an attempt): a drain that ended this way did not finish.
  [[nodiscard]] bool nats_unavailable() const noexcept;
  /// Cycles until `stop`; waits poll_interval when idle, backs off after errors (logged, never
  /// thrown), runs cleanup every cleanup_interval. On stop, finishes the round in flight and gives
  /// back the rows not yet published (no attempt counted) before returning.
  void run(std::stop_token stop);
  /// Deletes sent rows older than cleanup_after, in bounded batches. Returns rows deleted.
  std::size_t cleanup();

  [[nodiscard]] RelayStats stats() const;
  [[nodiscard]] const std::string& relay_id() const noexcept;
  /// The relay's own store, for the relay's thread. On SQLite with hold_claims its claims read
  /// and its marks take any unsent row (the relay lock makes that safe for the relay alone):
  /// claiming through it while the relay runs breaks what the relay has in flight.
  [[nodiscard]] OutboxStore& store() noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// The backoff delay after `attempts` failed attempts (1-based), from a schedule; the last
/// entry repeats.
[[nodiscard]] Millis backoff_delay(const std::vector<Millis>& schedule, int attempts) noexcept;

}  // namespace natspubsub
