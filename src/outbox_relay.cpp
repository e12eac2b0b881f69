#include <natspubsub/outbox_relay.hpp>

#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <random>
#include <thread>

#include <natspubsub/connection.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/log.hpp>
#include <natspubsub/outbox.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/store/database.hpp>

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
};

OutboxRelay::OutboxRelay(Connection& connection, store::Database& database, RelayOptions options)
    : impl_(std::make_unique<Impl>()) {
  if (options.relay_id.empty()) options.relay_id = default_relay_id();
  if (options.batch_size == 0) throw ConfigError("relay.batch_size", "must be >= 1");
  if (options.max_attempts < 1) throw ConfigError("relay.max_attempts", "must be >= 1");
  if (options.lease <= options.ack_timeout)
    throw ConfigError("relay.lease", "must be longer than relay.ack_timeout (a batch must finish inside its lease)");
  impl_->connection = &connection;
  impl_->database = &database;
  impl_->options = std::move(options);
  impl_->store = make_outbox_store(database);
  impl_->publisher = std::make_unique<Publisher>(connection);
  impl_->last_cleanup = std::chrono::steady_clock::now();
}

OutboxRelay::~OutboxRelay() = default;

const std::string& OutboxRelay::relay_id() const noexcept { return impl_->options.relay_id; }
OutboxStore& OutboxRelay::store() noexcept { return *impl_->store; }

RelayStats OutboxRelay::stats() const {
  std::lock_guard lock(impl_->stats_mutex);
  return impl_->stats;
}

std::size_t OutboxRelay::run_once() {
  auto& o = impl_->options;
  auto& store = *impl_->store;
  if (!impl_->connection->connected()) return 0;  // nothing would be acknowledged: leave rows for later

  const auto started = std::chrono::steady_clock::now();
  auto rows = store.claim(o.relay_id, o.batch_size, o.lease);
  if (rows.empty()) return 0;

  std::vector<RawMessage> messages;
  messages.reserve(rows.size());
  for (const auto& row : rows) {
    RawMessage m;
    m.subject = row.subject;
    m.payload = row.payload;
    m.msg_id = row.event_id;
    m.headers = to_headers(row.headers);
    messages.push_back(std::move(m));
  }
  BatchOptions bo;
  bo.window = o.publish_window;
  bo.ack_timeout = o.ack_timeout;
  auto results = impl_->publisher->publish_raw_batch(messages, bo);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();

  std::vector<std::int64_t> acked;
  std::vector<OutboxFailure> retryable;
  std::vector<OutboxFailure> refused;
  uint64_t duplicates = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto& r = results[i];
    if (r) {
      acked.push_back(rows[i].id);
      duplicates += r.duplicate ? 1 : 0;
      continue;
    }
    OutboxFailure f{rows[i].id, r.error->message, backoff_delay(o.backoff, rows[i].attempts + 1)};
    (r.error->retryable ? retryable : refused).push_back(std::move(f));
  }

  if (!acked.empty()) {
    if (o.delete_sent)
      store.delete_sent(o.relay_id, acked);
    else
      store.mark_sent(o.relay_id, acked);
  }
  OutboxFailResult fr;
  uint64_t released = 0;
  if (!retryable.empty()) {
    if (!impl_->connection->connected()) {
      // The connection dropped under the batch: not the rows' fault, so no attempt is counted.
      std::vector<std::int64_t> ids;
      for (const auto& f : retryable) ids.push_back(f.id);
      released = store.release(o.relay_id, ids);
    } else {
      fr = store.mark_failed(o.relay_id, retryable, o.max_attempts);
    }
  }
  if (!refused.empty()) {
    // Refused by the server or invalid (too large, bad subject): another try cannot succeed.
    auto r = store.mark_failed(o.relay_id, refused, 1);
    fr.failed.insert(fr.failed.end(), r.failed.begin(), r.failed.end());
    for (const auto& f : refused) logger()->error("outbox row {} failed permanently: {}", f.id, f.error);
  }
  if (!retryable.empty())
    logger()->warn("outbox relay {}: {} of {} rows not acknowledged ({}); first error: {}", o.relay_id,
                   retryable.size(), rows.size(), released ? "released" : "rescheduled", retryable.front().error);

  std::lock_guard lock(impl_->stats_mutex);
  auto& s = impl_->stats;
  s.batches++;
  s.published += acked.size();
  s.duplicates += duplicates;
  s.retried += fr.rescheduled.size();
  s.failed += fr.failed.size();
  s.released += released;
  for (size_t i = 0; i < acked.size(); ++i) s.publish_latency.record(seconds);
  return rows.size();
}

std::size_t OutboxRelay::drain(std::stop_token stop) {
  std::size_t total = 0;
  while (!stop.stop_requested()) {
    auto n = run_once();
    if (n == 0) break;
    total += n;
  }
  return total;
}

std::size_t OutboxRelay::cleanup() {
  std::size_t total = 0;
  const auto& o = impl_->options;
  for (int round = 0; round < 1000; ++round) {  // bounded: at most 1000 batches per call
    auto n = impl_->store->cleanup_sent(o.cleanup_after, o.cleanup_batch);
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
  logger()->info("outbox relay {} started (batch {}, window {})", o.relay_id, o.batch_size, o.publish_window);
  while (!stop.stop_requested()) {
    try {
      auto n = run_once();
      consecutive_errors = 0;
      if (std::chrono::steady_clock::now() - impl_->last_cleanup >= o.cleanup_interval) {
        impl_->last_cleanup = std::chrono::steady_clock::now();
        if (auto cleaned = cleanup(); cleaned > 0) logger()->info("outbox cleanup deleted {} sent rows", cleaned);
      }
      if (n == 0) sleep_for(stop, o.poll_interval);
    } catch (const std::exception& e) {
      // Database or NATS trouble: log, back off (capped at 30 s), try again. Leased rows come back
      // by themselves when their lease ends, so nothing is lost.
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
  logger()->info("outbox relay {} stopped", o.relay_id);
}

}  // namespace natspubsub
