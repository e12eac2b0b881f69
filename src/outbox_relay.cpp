#include <natspubsub/outbox_relay.hpp>

#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <exception>
#include <future>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <thread>
#include <unordered_map>
#include <utility>

#include <nats/nats.h>

#include <natspubsub/connection.hpp>
#include <natspubsub/dlq.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/log.hpp>
#include <natspubsub/outbox.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/store/database.hpp>
#include <natspubsub/store/sqlite.hpp>
#if NATSPUBSUB_HAS_POSTGRES
#include <natspubsub/store/postgres.hpp>

#include "store/postgres_held_claims.hpp"
#endif
#include "store/outbox_internal.hpp"

namespace natspubsub {
namespace {

std::string default_relay_id() {
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  return std::string(host) + "-" + std::to_string(getpid()) + "-" + new_uuid().substr(0, 8);
}

Headers to_headers(const nlohmann::json& j) {
  Headers h;
  if (!j.is_object()) return h;
  for (const auto& [key, value] : j.items()) h[key] = value.is_string() ? value.get<std::string>() : value.dump();
  return h;
}

// Failures that say NATS or the stream is unavailable (no PubAck in time, as while a stream elects
// a leader; the connection down), not that the row is wrong: they back off the relay, not the row.
bool is_outage(const PublishFailure& f) {
  switch (static_cast<natsStatus>(f.status)) {
    case NATS_TIMEOUT:
    case NATS_CONNECTION_CLOSED:
    case NATS_CONNECTION_DISCONNECTED:
    case NATS_NOT_YET_CONNECTED:
    case NATS_IO_ERROR:
    case NATS_STALE_CONNECTION:
      return true;
    default:
      return false;
  }
}

// For a publish that no stream answered: does a stream take `subject`? JetStream's meta layer
// answers `$JS.API.STREAM.NAMES` even while the stream itself has no leader, so "yes" means the
// stream is there but electing a leader (or its servers are down): an outage, not the row's
// fault. nullopt when the question got no answer either (NATS itself is not answering).
std::optional<bool> stream_takes(natsConnection* nc, const std::string& subject) {
  if (nc == nullptr) return std::nullopt;
  const std::string request = nlohmann::json{{"subject", subject}}.dump();
  natsMsg* reply = nullptr;
  if (natsConnection_Request(&reply, nc, "$JS.API.STREAM.NAMES", request.data(), static_cast<int>(request.size()),
                             2000) != NATS_OK)
    return std::nullopt;
  std::optional<bool> found;
  try {
    const auto j = nlohmann::json::parse(std::string(natsMsg_GetData(reply), static_cast<size_t>(natsMsg_GetDataLength(reply))));
    if (!j.contains("error")) found = j.value("total", 0) > 0;
  } catch (const std::exception&) {
  }
  natsMsg_Destroy(reply);
  return found;
}

bool control_char(unsigned char c) { return c < 0x20 || c == 0x7f; }

// Why nats-server could not take this row as a message, or nullopt. A row written by hand can
// hold anything; sent as it is, a blank in the subject or a line break in a header makes the
// server close the connection (a protocol error), which fails every message in flight with it.
std::optional<std::string> publish_problem(const OutboxRow& row, size_t max_payload) {
  const auto& s = row.subject;
  if (s.empty()) return "the subject is empty";
  for (unsigned char c : s) {
    if (c == ' ' || c == '\t' || control_char(c)) return "the subject \"" + s + "\" has a blank or a control character";
  }
  size_t start = 0;
  while (true) {
    const auto dot = s.find('.', start);
    const auto token = s.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    if (token.empty()) return "the subject \"" + s + "\" has an empty token";
    if (token == "*" || token == ">") return "the subject \"" + s + "\" has a wildcard (publish needs a literal subject)";
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  if (row.event_id.empty()) return "event_id is empty (it becomes the Nats-Msg-Id)";
  for (unsigned char c : row.event_id)
    if (control_char(c)) return "event_id has a control character";
  if (!row.headers.is_null() && !row.headers.is_object()) return "headers is not a JSON object";
  Headers headers;
  if (row.headers.is_object()) {
    for (const auto& [key, value] : row.headers.items()) {
      if (key.empty()) return "a header name is empty";
      for (unsigned char c : key)
        if (c <= ' ' || c == ':' || c == 0x7f) return "the header name \"" + key + "\" has a blank, ':' or a control character";
      const std::string text = value.is_string() ? value.get<std::string>() : value.dump();
      for (unsigned char c : text)
        if (c == '\r' || c == '\n') return "the value of header " + key + " has a line break";
      headers[key] = text;
    }
  }
  headers["Nats-Msg-Id"] = row.event_id;
  if (const auto size = wire_size(headers, row.payload.size()); size > max_payload)
    return "headers and payload are " + std::to_string(size) + " bytes, over the server's max_payload of " +
           std::to_string(max_payload);
  return std::nullopt;
}

// Waits up to `d` unless stop is requested first.
void sleep_for(std::stop_token stop, Millis d) {
  std::mutex m;
  std::condition_variable_any cv;
  std::unique_lock lock(m);
  cv.wait_for(lock, stop, d, [] { return false; });
}

}  // namespace

void PublishLatencyHistogram::record(double seconds) {
  size_t i = 0;
  while (i < kBounds.size() && seconds > kBounds[i]) ++i;
  counts[i]++;
  sum_seconds += seconds;
  count++;
}

Millis backoff_delay(const std::vector<Millis>& schedule, int attempts) noexcept {
  if (schedule.empty()) return Millis{1000};
  size_t i = static_cast<size_t>(std::max(1, attempts)) - 1;
  return schedule[std::min(i, schedule.size() - 1)];
}

struct OutboxRelay::Impl {
  Connection* connection = nullptr;
  store::Database* database = nullptr;
  RelayOptions options;
  std::unique_ptr<OutboxStore> store;
  std::unique_ptr<Publisher> publisher;
  mutable std::mutex stats_mutex;
  RelayStats stats;
  std::chrono::steady_clock::time_point last_cleanup{};
  bool outage = false;        // the last run_once saw NATS or a stream not answering: back off
  bool disconnected = false;  // the last run_once found the connection down and claimed nothing
  std::int64_t up_to_id = std::numeric_limits<std::int64_t>::max();  // claims take rows up to this id
  // run() and drain() claim the next batch on another thread while this one publishes (below);
  // the store's one database connection is used by one of them at a time.
  std::mutex store_mutex;
  bool pipelined = false;  // the lease covers two batches back to back (constructor)
  // With few hot keys the batch in flight holds the head of every key, so a claim ahead finds
  // nothing (and costs a window scan under the claim lock). After such a miss the next
  // kAheadPause batches are claimed without claiming ahead.
  static constexpr int kAheadPause = 8;
  int ahead_paused = 0;
  // Held claims: the last claim (not ahead) found rows, all behind batches other relays hold.
  // run() then waits kBehindWait (or the poll interval if longer) before claiming again: an
  // immediate retry finds the same, and its momentary row locks keep the other relays' next
  // claims off those rows (4 relays over 100 hot keys, polling every 20 ms: 2,500 msgs/s
  // together against 10,900 for one).
  static constexpr Millis kBehindWait{100};
  bool behind_others = false;

#if NATSPUBSUB_HAS_POSTGRES
  // PostgreSQL with hold_claims: batches held by row locks (store/postgres_held_claims.hpp).
  std::unique_ptr<detail::HeldClaims> held_claims;
  // Where a claim ahead starts (claim()). One claim at a time, from either thread, ordered by
  // the claim ahead's future: plain fields.
  static constexpr Millis kFullScanEvery{250};
  std::int64_t last_claimed_id = std::numeric_limits<std::int64_t>::min();
  std::chrono::steady_clock::time_point next_full_scan{};
#endif
  struct Claimed {
    std::vector<OutboxRow> rows;
    std::chrono::steady_clock::time_point at;  // when the claim started: the lease runs from here
    bool prefetched = false;                   // claimed while the previous batch was publishing
#if NATSPUBSUB_HAS_POSTGRES
    // Held claims: the rows are locked in this batch's open transaction and nothing was written;
    // its outcome is written in one go at the end (finish), or dropped (abandon: all as it was).
    std::unique_ptr<detail::HeldBatch> held;
#endif
  };
  [[nodiscard]] bool holds_claims() const noexcept {
#if NATSPUBSUB_HAS_POSTGRES
    return held_claims != nullptr;
#else
    return false;
#endif
  }
  template <class F>
  auto with_store(F&& f) {
    std::lock_guard lock(store_mutex);
    return f(*store);
  }
  Claimed claim(bool prefetched) {
    Claimed c;
    c.at = std::chrono::steady_clock::now();
    c.prefetched = prefetched;
#if NATSPUBSUB_HAS_POSTGRES
    if (held_claims) {  // thread-safe, and on connections of its own: no store_mutex
      // A claim ahead starts after the last batch claimed (or before the first row that claim
      // found and did not keep, such as a row behind this relay's own batch of its key): the
      // rows before it are held by this relay's batches in flight (the one publishing, the one
      // whose outcome is being written), and stepping over their locks was most of a claim's
      // time (13 of 16 ms per 500 rows). Rows below it that become claimable later (given
      // back, due after a backoff, unkeyed rows committed late with a lower id) wait for a
      // claim from the start: one at least every kFullScanEvery, and every claim not made ahead.
      std::int64_t after = std::numeric_limits<std::int64_t>::min();
      const auto now = std::chrono::steady_clock::now();
      if (prefetched && now < next_full_scan) after = last_claimed_id;
      else next_full_scan = now + kFullScanEvery;
      c.held = held_claims->claim(options.batch_size, up_to_id, after);
      c.rows = std::move(c.held->rows());
      last_claimed_id = c.held->resume_after();
      if (c.rows.empty()) {
        if (!prefetched) behind_others = c.held->behind_others();
        c.held.reset();
      }
      return c;
    }
#endif
    c.rows = with_store([&](OutboxStore& st) { return st.claim(options.relay_id, options.batch_size, options.lease, up_to_id); });
    return c;
  }
  // Rows of the last batch acknowledged but not yet marked sent: with a claim ahead, the thread
  // making it marks them first, so the publishing thread does not wait for the mark.
  std::mutex marks_mutex;
  std::vector<std::int64_t> unmarked;
  void mark(std::span<const std::int64_t> ids) {
    if (ids.empty()) return;
    with_store([&](OutboxStore& st) { return options.delete_sent ? st.delete_sent(options.relay_id, ids)
                                                                 : st.mark_sent(options.relay_id, ids); });
  }
  // Marks `ids`; if that fails they are kept for the next try (flush_marks), and it throws.
  void mark_or_keep(std::vector<std::int64_t> ids) {
    try {
      mark(ids);
    } catch (...) {
      std::lock_guard lock(marks_mutex);
      unmarked.insert(unmarked.end(), ids.begin(), ids.end());
      throw;
    }
  }
  std::vector<std::int64_t> take_unmarked() {
    std::lock_guard lock(marks_mutex);
    return std::exchange(unmarked, {});
  }
  // Held claims in run() and drain(): the outcome of batch N is written on another thread while
  // batch N+1 publishes (its rows stay locked until then, so no claim takes the rows behind
  // them; claims made meanwhile pass them over). At most one is being written; publish() waits
  // for it before handing over the next, and flush_marks() before a claim that is not ahead.
  std::future<void> finishing;
  void join_finishing() {
    if (finishing.valid()) finishing.get();  // rethrows the outcome's DatabaseError
  }
  // Makes the last batch's outcome durable: marks the acknowledged rows (lease claims), or waits
  // for the held batch's outcome to be written.
  void flush_marks() {
    join_finishing();
    mark_or_keep(take_unmarked());
  }
  void flush_marks_quietly() noexcept;
  // A held batch's outcome that could not be written: rolled back, its rows are as they were and
  // are published again (JetStream drops the copies inside its duplicate window).
  void not_recorded(const std::exception& e) noexcept {
    logger()->warn("outbox relay {}: could not record a published batch: {}", options.relay_id, e.what());
    std::lock_guard lock(stats_mutex);
    stats.errors++;
  }
  std::size_t publish(Claimed batch, std::stop_token stop = {}, bool defer_mark = false);
  struct Recorded;
  void record(const Recorded& r);
  std::size_t cycle(std::optional<std::future<Claimed>>& next, std::stop_token stop);
  void release_quietly(std::optional<std::future<Claimed>>& next) noexcept;
};

OutboxRelay::OutboxRelay(Connection& connection, store::Database& database, RelayOptions options)
    : impl_(std::make_unique<Impl>()) {
  if (options.relay_id.empty()) options.relay_id = default_relay_id();
  if (options.batch_size == 0) throw ConfigError("relay.batch_size", "must be >= 1");
  if (options.max_attempts < 1) throw ConfigError("relay.max_attempts", "must be >= 1");
  if (options.publish_window < 1) throw ConfigError("relay.publish_window", "must be >= 1");
  if (options.ack_timeout.count() <= 0) throw ConfigError("relay.ack_timeout", "must be greater than 0 ms");
  // With `publish_window` messages in flight, each waiting up to ack_timeout for its PubAck, a
  // round of a batch takes at most ceil(batch_size / publish_window) x ack_timeout (all of the
  // batch when no row has a key). A lease that can end before that lets another relay claim rows
  // that are still being published. Later rounds are started only while they fit (run_once).
  const auto rounds = (options.batch_size + static_cast<std::size_t>(options.publish_window) - 1) /
                      static_cast<std::size_t>(options.publish_window);
  const auto longest = options.ack_timeout * static_cast<int64_t>(rounds);
  if (options.lease <= longest)
    throw ConfigError("relay.lease", "must be longer than the longest a batch can take, ceil(batch_size " +
                                         std::to_string(options.batch_size) + " / publish_window " +
                                         std::to_string(options.publish_window) + ") x ack_timeout " +
                                         std::to_string(options.ack_timeout.count()) + " ms = " +
                                         std::to_string(longest.count()) +
                                         " ms: raise the lease, or lower the batch size or the ack timeout");
  // A batch claimed while the previous one publishes waits for it, so its rows are held for up
  // to two batches: claim ahead only when the lease covers that.
  impl_->pipelined = options.lease > 2 * longest;
  impl_->connection = &connection;
  impl_->database = &database;
  impl_->options = std::move(options);
  if (auto* sqlite = dynamic_cast<store::SqliteDatabase*>(&database); sqlite != nullptr)
    impl_->store = detail::make_sqlite_relay_store(*sqlite, impl_->options.hold_claims);  // the file's relay lock
  else
    impl_->store = make_outbox_store(database);
  impl_->publisher = std::make_unique<Publisher>(connection);
  impl_->last_cleanup = std::chrono::steady_clock::now();
#if NATSPUBSUB_HAS_POSTGRES
  if (auto* pg = dynamic_cast<store::PostgresDatabase*>(&database); pg != nullptr && impl_->options.hold_claims)
    impl_->held_claims = std::make_unique<detail::HeldClaims>(pg->url(), impl_->options.lease);
#endif
}

OutboxRelay::~OutboxRelay() = default;

const std::string& OutboxRelay::relay_id() const noexcept { return impl_->options.relay_id; }
OutboxStore& OutboxRelay::store() noexcept { return *impl_->store; }

RelayStats OutboxRelay::stats() const {
  std::lock_guard lock(impl_->stats_mutex);
  return impl_->stats;
}

namespace {

RawMessage to_message(const OutboxRow& row) {
  RawMessage m;
  m.subject = row.subject;
  m.payload = row.payload;
  m.msg_id = row.event_id;
  m.headers = to_headers(row.headers);
  return m;
}

// What became of each row of a batch, gathered for the store updates at its end.
struct BatchOutcome {
  std::vector<std::int64_t> acked;
  std::vector<std::int64_t> unavailable;  // NATS or the stream did not answer: released, no attempt
  std::string unavailable_error;
  std::vector<OutboxFailure> retryable;
  std::vector<OutboxFailure> refused;     // refused by the server or not publishable: failed now
  std::vector<std::int64_t> held_back;    // never published: behind a failed row of their key, or out of time
  uint64_t duplicates = 0;
};

// The rounds of a batch: round r holds the r-th row of every key (in id order) and, in round 0,
// every row without a key. So no key ever has two rows in one round.
std::vector<std::vector<std::size_t>> rounds_of(const std::vector<OutboxRow>& rows) {
  std::vector<std::vector<std::size_t>> rounds;
  std::unordered_map<std::string, std::size_t> next_round;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const std::size_t r = rows[i].partition_key ? next_round[*rows[i].partition_key]++ : 0;
    if (rounds.size() <= r) rounds.resize(r + 1);
    rounds[r].push_back(i);
  }
  return rounds;
}

}  // namespace

// A batch's outcome once it is in the store: logs and stats.
struct OutboxRelay::Impl::Recorded {
  const BatchOutcome& out;
  OutboxFailResult fr;
  uint64_t released = 0;
  bool connection_lost = false;
  std::size_t claimed = 0;
  double seconds = 0;
};

std::size_t OutboxRelay::run_once() {
  // Marks a drain() or run() that ended on an error left behind, first: the claim must see
  // those rows sent (a read claim on SQLite would publish them again).
  impl_->flush_marks();
  impl_->outage = false;
  impl_->disconnected = !impl_->connection->connected();
  if (impl_->disconnected) return 0;  // nothing would be acknowledged: leave rows for later
  return impl_->publish(impl_->claim(false));
}

// Publishes one claimed batch and records what became of each row. Returns the rows claimed.
std::size_t OutboxRelay::Impl::publish(Claimed batch, std::stop_token stop, bool defer_mark) {
  auto& o = options;
  outage = false;
  auto rows = std::move(batch.rows);
  if (rows.empty()) return 0;
  auto started = batch.at;
#if !NATSPUBSUB_HAS_POSTGRES
  const void* held = nullptr;
#else
  detail::HeldBatch* held = batch.held.get();
  if (held != nullptr && batch.prefetched && std::chrono::steady_clock::now() - started >= o.lease / 4) {
    // Held ahead behind a long batch: a held batch has no lease to renew (PostgreSQL ends a
    // transaction idle for the lease), so it is given back whole and claimed again afresh.
    held->abandon();
    ahead_paused = kAheadPause;  // batches this long: the next few are not claimed ahead
    std::lock_guard lock(stats_mutex);
    stats.released += rows.size();
    return rows.size();
  }
#endif
  if (held == nullptr && batch.prefetched && std::chrono::steady_clock::now() - started >= o.lease / 4) {
    // Claimed ahead behind a long batch: renew its lease rather than let its rounds be skipped
    // (and the same rows claimed ahead and skipped again behind every long batch). A row no
    // longer ours (its lease ended and another relay took it) gives the whole batch back.
    std::vector<std::int64_t> ids;
    for (const auto& row : rows) ids.push_back(row.id);
    const auto now = std::chrono::steady_clock::now();
    if (with_store([&](OutboxStore& st) { return st.renew_lease(o.relay_id, ids, o.lease); }) == ids.size()) {
      started = now;
      batch.prefetched = false;
    } else {
      const auto n = with_store([&](OutboxStore& st) { return st.release(o.relay_id, ids); });
      std::lock_guard lock(stats_mutex);
      stats.released += n;
      return rows.size();
    }
  }

  // Rows the server could not take are failed now, before anything is sent; the later rows of
  // their key in this batch go back unpublished and then wait behind the failed row (claim rule).
  natsConnection* nc = connection->native();
  const int64_t server_max = nc != nullptr ? natsConnection_GetMaxPayload(nc) : 0;
  const size_t max_payload = server_max > 0 ? static_cast<size_t>(server_max) : size_t{1024 * 1024};
  BatchOutcome out;
  std::set<std::string> stopped_keys;  // a row of the key failed: its later rows are not published
  std::vector<OutboxRow> publishable;
  publishable.reserve(rows.size());
  for (auto& row : rows) {
    if (row.partition_key && stopped_keys.count(*row.partition_key) > 0) {
      out.held_back.push_back(row.id);
      continue;
    }
    if (auto problem = publish_problem(row, max_payload)) {
      out.refused.push_back({row.id, "not publishable: " + *problem, Millis{0}});
      if (row.partition_key) stopped_keys.insert(*row.partition_key);
      continue;
    }
    publishable.push_back(std::move(row));
  }
  const size_t claimed = rows.size();
  rows = std::move(publishable);

  // Per-key order: a row is published only once the PubAck of the previous row of its key is in.
  // The batch goes out in rounds (round r: the r-th row of each key, all unkeyed rows in round 0),
  // each round with up to publish_window messages in flight and every PubAck awaited before the
  // next round starts. A key whose row fails in a round is stopped: its later rows are released
  // unpublished. So whatever the failure (refused, timed out, lost with a dropped socket while
  // cnats' reconnect buffer carries other messages through), no later row of a key is ever sent
  // before an earlier one is stored. Many keys share each round, so the window stays full; a
  // single hot key costs one round trip per row.
  BatchOptions bo;
  bo.window = o.publish_window;
  bo.ack_timeout = o.ack_timeout;
  // Acknowledged rows are marked sent after the batch, and also between rounds once 200 ms have
  // passed since the last mark: a relay that dies in a long batch (one hot key: a round trip per
  // row) then leaves little acknowledged but unmarked, which a later relay would publish again.
  std::size_t acked_marked = 0;  // out.acked[0, acked_marked) are marked
  auto last_mark = started;
  auto mark_acked = [&] {
    // A held batch writes its outcome once, at its end: a relay that dies before leaves its
    // rows as they were (published ones are published again, inside the duplicate window).
    if (held != nullptr || acked_marked == out.acked.size()) return;
    std::span<const std::int64_t> ids(out.acked.data() + acked_marked, out.acked.size() - acked_marked);
    with_store([&](OutboxStore& st) { return o.delete_sent ? st.delete_sent(o.relay_id, ids) : st.mark_sent(o.relay_id, ids); });
    acked_marked = out.acked.size();
    last_mark = std::chrono::steady_clock::now();
  };
  std::unordered_map<std::string, std::optional<bool>> stream_known;  // subject -> a stream takes it
  bool stop_all = false;  // an outage, or the lease running short: nothing more is published
  int published_rounds = 0;
  for (const auto& round : rounds_of(rows)) {
    std::vector<std::size_t> go;
    go.reserve(round.size());
    for (auto i : round) {
      if (stop_all || (rows[i].partition_key && stopped_keys.count(*rows[i].partition_key) > 0))
        out.held_back.push_back(rows[i].id);
      else
        go.push_back(i);
    }
    if (go.empty()) continue;
    // A round takes at most ceil(n / window) x ack_timeout; a later round that could end after
    // the lease is not started (another relay could then claim its rows while they are in
    // flight). The first round always goes: the constructor made sure the lease covers it, and
    // skipping it after a slow claim would release the batch and claim it again, for ever.
    // Marked before the lease check below: the mark may wait for the claim ahead.
    if (std::chrono::steady_clock::now() - last_mark >= std::chrono::milliseconds(200)) mark_acked();
    // A batch claimed ahead has waited for the previous one, so its first round is checked too
    // (its rows are released and the next claim, not made ahead, starts afresh).
    const auto round_max = o.ack_timeout * static_cast<int64_t>((go.size() + bo.window - 1) / bo.window);
    // A held batch must also be written before PostgreSQL ends its transaction (idle for the
    // lease): a margin for the outcome's statements and the checks a failed round makes.
    const auto limit = held != nullptr ? o.lease - std::max<Millis>(Millis{1000}, o.lease / 10) : o.lease;
    // Stop requested (SIGTERM): the rounds not started are given back rather than finished.
    if ((published_rounds > 0 || batch.prefetched) &&
        (stop.stop_requested() || std::chrono::steady_clock::now() - started + round_max >= limit)) {
      for (auto i : go) out.held_back.push_back(rows[i].id);
      stop_all = true;
      continue;
    }
    std::vector<RawMessage> messages;
    messages.reserve(go.size());
    for (auto i : go) messages.push_back(to_message(rows[i]));
    const auto results = publisher->publish_raw_batch(messages, bo);
    ++published_rounds;
    for (std::size_t k = 0; k < go.size(); ++k) {
      const auto& row = rows[go[k]];
      const auto& r = results[k];
      if (r) {
        out.acked.push_back(row.id);
        out.duplicates += r.duplicate ? 1 : 0;
        continue;
      }
      if (row.partition_key) stopped_keys.insert(*row.partition_key);
      bool unavailable = is_outage(*r.error);
      if (!unavailable && r.error->status == static_cast<int>(NATS_NO_RESPONDERS)) {
        // No responders: no stream for the subject (the row's fault: an attempt), or a stream
        // electing a leader (an outage: no attempt). Asked once per subject per batch.
        auto it = stream_known.find(row.subject);
        if (it == stream_known.end()) it = stream_known.emplace(row.subject, stream_takes(nc, row.subject)).first;
        unavailable = it->second.value_or(true);
      }
      if (unavailable) {
        out.unavailable.push_back(row.id);
        if (out.unavailable_error.empty()) out.unavailable_error = r.error->message;
        stop_all = true;
        continue;
      }
      OutboxFailure f{row.id, r.error->message, backoff_delay(o.backoff, row.attempts + 1)};
      (r.error->retryable ? out.retryable : out.refused).push_back(std::move(f));
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();

  const bool connection_lost = !out.retryable.empty() && !connection->connected();
  if (!out.unavailable.empty()) {
    outage = true;
    logger()->warn("outbox relay {}: {} of {} rows not acknowledged ({}); released without counting an attempt, "
                   "the relay backs off",
                   o.relay_id, out.unavailable.size(), claimed, out.unavailable_error);
  }
#if NATSPUBSUB_HAS_POSTGRES
  if (held != nullptr) {
    // One transaction for the whole outcome. What is in none of the lists (unavailable, held
    // back, lost with the connection) is left as it was: pending, no attempt counted.
    detail::HeldOutcome ho;
    ho.sent = out.acked;
    ho.delete_sent = o.delete_sent;
    ho.max_attempts = o.max_attempts;
    if (!connection_lost) ho.failures = out.retryable;
    ho.refused = out.refused;
    const uint64_t released = out.unavailable.size() + out.held_back.size() + (connection_lost ? out.retryable.size() : 0);
    auto write = [this, owned = std::move(batch.held), ho = std::move(ho), out = std::move(out), released,
                  connection_lost, claimed, seconds] {
      Recorded r{out, owned->finish(ho), released, connection_lost, claimed, seconds};
      record(r);
    };
    // The previous batch's outcome first: one at a time, in order. If it failed (its rows are
    // as they were, to be published again), this batch's outcome is still written, now, and
    // then the failure is passed on (tests/outbox_relay_test.cpp, "a held batch's outcome that
    // fails while the next batch publishes").
    // This batch's transaction is idle while it waits, and `limit` does not count the wait: if
    // the previous outcome takes longer than the margin this batch's rounds left, PostgreSQL ends
    // this transaction (idle for the lease) and this outcome fails as above. Its rounds ended
    // before, so that costs a republish (dropped by JetStream), not a row or the key order
    // (tests/outbox_relay_test.cpp, "a previous outcome slower than the lease margin").
    std::exception_ptr previous;
    try {
      join_finishing();
    } catch (...) {
      previous = std::current_exception();
    }
    if (defer_mark && !previous) {
      finishing = std::async(std::launch::async, std::move(write));  // joined by the next batch or flush_marks
    } else if (previous) {
      try {
        write();
      } catch (const std::exception& e) {  // both failed: this one is logged and counted, the first passed on
        not_recorded(e);
      }
      std::rethrow_exception(previous);
    } else {
      write();
    }
    return claimed;
  }
#endif
  OutboxFailResult fr;
  uint64_t released = 0;
  if (defer_mark) {
    // Marked by the next claim ahead (cycle), or by flush_marks when there is none.
    std::lock_guard lock(marks_mutex);
    unmarked.insert(unmarked.end(), out.acked.begin() + static_cast<std::ptrdiff_t>(acked_marked), out.acked.end());
  } else {
    mark_acked();
  }
  if (!out.retryable.empty()) {
    if (connection_lost) {
      // The connection dropped under the batch: not the rows' fault, so no attempt is counted.
      std::vector<std::int64_t> ids;
      for (const auto& f : out.retryable) ids.push_back(f.id);
      released = with_store([&](OutboxStore& st) { return st.release(o.relay_id, ids); });
    } else {
      fr = with_store([&](OutboxStore& st) { return st.mark_failed(o.relay_id, out.retryable, o.max_attempts); });
    }
  }
  if (!out.unavailable.empty())
    released += with_store([&](OutboxStore& st) { return st.release(o.relay_id, out.unavailable); });
  if (!out.held_back.empty())
    released += with_store([&](OutboxStore& st) { return st.release(o.relay_id, out.held_back); });
  if (!out.refused.empty()) {
    // Refused by the server or invalid (too large, bad subject): another try cannot succeed.
    auto r = with_store([&](OutboxStore& st) { return st.mark_failed(o.relay_id, out.refused, 1); });
    fr.failed.insert(fr.failed.end(), r.failed.begin(), r.failed.end());
  }
  record(Recorded{out, fr, released, connection_lost, claimed, seconds});
  return claimed;
}


void OutboxRelay::Impl::record(const Recorded& r) {
  const auto& o = options;
  const auto& out = r.out;
  for (const auto& f : out.refused) logger()->error("outbox row {} failed permanently: {}", f.id, f.error);
  if (!out.retryable.empty())
    logger()->warn("outbox relay {}: {} of {} rows not acknowledged ({}); first error: {}", o.relay_id,
                   out.retryable.size(), r.claimed, r.connection_lost ? "released" : "rescheduled",
                   out.retryable.front().error);
  std::lock_guard lock(stats_mutex);
  auto& s = stats;
  s.batches++;
  s.published += out.acked.size();
  s.duplicates += out.duplicates;
  s.retried += r.fr.rescheduled.size();
  s.failed += r.fr.failed.size();
  s.released += r.released;
  for (size_t i = 0; i < out.acked.size(); ++i) s.publish_latency.record(r.seconds);
}

// One step of run() and drain(): publishes the batch claimed ahead (or claims one now), and
// meanwhile claims the next one on another thread, so the database work of batch N+1 overlaps
// the publishing of batch N. Per-key order needs nothing more: while batch N is publishing its
// rows are held by this relay, so the claim of N+1 takes no later row of their keys (claim rule).
// Returns the rows of the batch published; 0 when nothing was claimable or NATS is disconnected.
std::size_t OutboxRelay::Impl::cycle(std::optional<std::future<Claimed>>& next, std::stop_token stop) {
  outage = false;
  Claimed batch;
  bool missed_ahead = false;
  if (next) {
    auto ahead = std::move(*next);
    next.reset();
    batch = ahead.get();
    missed_ahead = batch.rows.empty();
    disconnected = false;
  }
  if (batch.rows.empty()) {
    // Nothing claimed ahead (or nothing was claimable then; rows the last batch gave back may be now).
    flush_marks();  // the claim must see the last batch's rows sent
    disconnected = !connection->connected();
    if (disconnected) return 0;  // nothing would be acknowledged: leave rows for later
    batch = claim(false);
    if (batch.rows.empty()) return 0;
    if (missed_ahead) ahead_paused = kAheadPause;  // rows were there, behind the batch in flight
  }
  const bool ahead = ahead_paused == 0;
  if (ahead_paused > 0) --ahead_paused;
  if (pipelined && ahead && !stop.stop_requested() && connection->connected() && holds_claims()) {
    // Held claims: batch N is written when it ends (publish), on its own connection; batch N+1
    // is claimed meanwhile on another one. Batch N's locks keep the later rows of its keys out.
    next = std::async(std::launch::async, [this] { return claim(true); });
  } else if (pipelined && ahead && !stop.stop_requested() && connection->connected()) {
    // The previous batch's acknowledged rows are marked sent in the claim's transaction, off the
    // publishing thread's path (one commit for both).
    next = std::async(std::launch::async, [this] {
      auto ids = take_unmarked();  // taken here: a thread that never starts loses none
      Claimed c;
      c.at = std::chrono::steady_clock::now();
      c.prefetched = true;
      try {
        c.rows = with_store([&](OutboxStore& st) {
          return st.mark_sent_and_claim(options.relay_id, ids, options.delete_sent, options.batch_size, options.lease,
                                        up_to_id);
        });
      } catch (...) {
        std::lock_guard lock(marks_mutex);  // neither happened: mark them next time
        unmarked.insert(unmarked.end(), ids.begin(), ids.end());
        throw;
      }
      return c;
    });
  } else {
    flush_marks();
  }
  return publish(std::move(batch), stop, pipelined);
}

void OutboxRelay::Impl::flush_marks_quietly() noexcept {
  try {
    join_finishing();
  } catch (const std::exception& e) {
    not_recorded(e);
  } catch (...) {
  }
  try {
    flush_marks();
  } catch (const std::exception& e) {
    // They stay leased to this relay until the lease ends, then are published again and dropped
    // by JetStream's deduplication (the lease is shorter than the duplicate window).
    logger()->warn("outbox relay {}: could not mark acknowledged rows sent: {}", options.relay_id, e.what());
  } catch (...) {
  }
}

// Gives back the batch claimed ahead, unpublished and without an attempt (stop, outage, error).
void OutboxRelay::Impl::release_quietly(std::optional<std::future<Claimed>>& next) noexcept {
  if (!next) return;
  try {
    auto ahead = std::move(*next);
    next.reset();
    auto batch = ahead.get();
    if (batch.rows.empty()) return;
#if NATSPUBSUB_HAS_POSTGRES
    if (batch.held) {
      batch.held->abandon();
      std::lock_guard lock(stats_mutex);
      stats.released += batch.rows.size();
      return;
    }
#endif
    std::vector<std::int64_t> ids;
    for (const auto& row : batch.rows) ids.push_back(row.id);
    const auto n = with_store([&](OutboxStore& st) { return st.release(options.relay_id, ids); });
    std::lock_guard lock(stats_mutex);
    stats.released += n;
  } catch (const std::exception& e) {
    // Its rows come back by themselves when their lease ends.
    logger()->warn("outbox relay {}: could not give back the batch claimed ahead: {}", options.relay_id, e.what());
  } catch (...) {
  }
  next.reset();
}

std::size_t OutboxRelay::drain(std::stop_token stop, std::int64_t up_to_id) {
  std::size_t total = 0;
  impl_->up_to_id = up_to_id;
  std::optional<std::future<Impl::Claimed>> next;
  try {
    while (!stop.stop_requested()) {
      auto n = impl_->cycle(next, stop);
      if (n == 0 || impl_->outage) break;  // nothing left, or NATS is not answering: stop here
      total += n;
    }
  } catch (...) {
    impl_->release_quietly(next);
    impl_->flush_marks_quietly();
    impl_->up_to_id = std::numeric_limits<std::int64_t>::max();
    throw;
  }
  impl_->release_quietly(next);
  impl_->up_to_id = std::numeric_limits<std::int64_t>::max();
  impl_->flush_marks();
  return total;
}

bool OutboxRelay::nats_unavailable() const noexcept { return impl_->outage || impl_->disconnected; }

std::size_t OutboxRelay::cleanup() {
  std::size_t total = 0;
  const auto& o = impl_->options;
  for (int round = 0; round < 1000; ++round) {  // bounded: at most 1000 batches per call
    auto n = impl_->with_store([&](OutboxStore& st) { return st.cleanup_sent(o.cleanup_after, o.cleanup_batch); });
    total += n;
    if (n < o.cleanup_batch) break;
  }
  std::lock_guard lock(impl_->stats_mutex);
  impl_->stats.cleaned += total;
  return total;
}

void OutboxRelay::run(std::stop_token stop) {
  const auto& o = impl_->options;
  int consecutive_errors = 0;
  int consecutive_outages = 0;
  logger()->info("outbox relay {} started (batch {}, window {})", o.relay_id, o.batch_size, o.publish_window);
  std::optional<std::future<Impl::Claimed>> next;  // the batch claimed ahead, see Impl::cycle
  while (!stop.stop_requested()) {
    try {
      auto n = impl_->cycle(next, stop);
      consecutive_errors = 0;
      if (impl_->outage) {
        impl_->release_quietly(next);
        impl_->flush_marks_quietly();
        // NATS or the stream did not answer: wait before the rows (released, no attempt counted)
        // are tried again, 250 ms doubling to 30 s.
        consecutive_outages++;
        sleep_for(stop, std::min<Millis>(Millis{30000}, Millis{250} * (1 << std::min(consecutive_outages - 1, 7))));
        continue;
      }
      consecutive_outages = 0;
      if (std::chrono::steady_clock::now() - impl_->last_cleanup >= o.cleanup_interval) {
        impl_->last_cleanup = std::chrono::steady_clock::now();
        if (auto cleaned = cleanup(); cleaned > 0) logger()->info("outbox cleanup deleted {} sent rows", cleaned);
      }
      if (n == 0) sleep_for(stop, impl_->behind_others ? std::max(o.poll_interval, Impl::kBehindWait) : o.poll_interval);
      impl_->behind_others = false;
    } catch (const std::exception& e) {
      // Database or NATS trouble: log, back off (capped at 30 s), try again. Leased rows come back
      // by themselves when their lease ends, so nothing is lost.
      impl_->release_quietly(next);
      impl_->flush_marks_quietly();
      consecutive_errors++;
      {
        std::lock_guard lock(impl_->stats_mutex);
        impl_->stats.errors++;
      }
      auto wait = std::min<Millis>(Millis{30000}, Millis{250} * (1 << std::min(consecutive_errors, 7)));
      logger()->error("outbox relay {}: {} (retrying in {} ms)", o.relay_id, e.what(), wait.count());
      if (const auto* db_error = dynamic_cast<const store::DatabaseError*>(&e); db_error && !db_error->query().empty()) {
        logger()->debug("outbox relay {}: the failing statement: {}", o.relay_id, db_error->query());
      }
      sleep_for(stop, wait);
    }
  }
  impl_->release_quietly(next);
  impl_->flush_marks_quietly();
  logger()->info("outbox relay {} stopped", o.relay_id);
}

}  // namespace natspubsub
