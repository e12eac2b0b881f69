#include <natspubsub/inbox_handler.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include <natspubsub/error.hpp>
#include <natspubsub/inbox.hpp>

#include "store/inbox_internal.hpp"

namespace natspubsub {

namespace {

constexpr int kDefaultMaxBatch = 32;
constexpr int kMaxBatchLimit = 64;
constexpr std::chrono::milliseconds kTurnTimeout{5000};

}  // namespace

struct InboxHandler::State {
  using Lease = std::pair<std::unique_ptr<store::Database>, std::unique_ptr<Inbox>>;

  DatabaseFactory open_database;
  Fn handler;
  std::atomic<int> max_batch{kDefaultMaxBatch};
  std::mutex mutex;
  // SQLite has one writer: workers of this handler take turns here, woken as soon as the
  // transaction before them ends, instead of in SQLite's busy handler, which sleeps 1, 2, 5,
  // 10 ... ms between tries. Other processes on the same file still meet the busy handler.
  std::timed_mutex sqlite_writer;
  // Known once a connection was opened. The turn is then taken before a connection is: the one
  // given back last is used again, whose page cache another connection's commit did not make stale.
  std::atomic<bool> sqlite{false};
  // Idle connections with their inbox; a worker takes one, uses it alone, gives it back.
  std::vector<Lease> idle;
  std::atomic<uint64_t> processed{0};
  std::atomic<uint64_t> duplicates{0};
  std::atomic<uint64_t> failures{0};
  std::atomic<uint64_t> batches{0};
  std::atomic<uint64_t> batched{0};

  Lease take() {
    Lease lease;
    {
      std::lock_guard lock(mutex);
      if (!idle.empty()) {
        lease = std::move(idle.back());
        idle.pop_back();
      }
    }
    if (!lease.first) {
      lease.first = open_database();
      lease.second = make_inbox(*lease.first);
      if (lease.first->backend() == store::Backend::sqlite) sqlite = true;
    }
    return lease;
  }

  // The turn (SQLite), then a connection; `turn` may already be held.
  Lease take_turn(std::unique_lock<std::timed_mutex>& turn) {
    if (sqlite && !turn.owns_lock()) wait_turn(turn);
    auto lease = take();
    if (!turn.owns_lock() && lease.first->backend() == store::Backend::sqlite) wait_turn(turn);
    return lease;
  }

  // As long as SQLite's own busy timeout (the library's default) would have waited for one
  // message, times the messages a batch may hold the turn for.
  void wait_turn(std::unique_lock<std::timed_mutex>& turn) {
    const auto timeout = kTurnTimeout * std::max(1, max_batch.load());
    turn = std::unique_lock(sqlite_writer, std::defer_lock);
    if (!turn.try_lock_for(timeout))
      throw store::RetryableDatabaseError("inbox: another worker of this InboxHandler held the SQLite write turn for " +
                                          std::to_string(timeout.count()) + " ms");
  }

  // The deliveries a batch is running now (any thread), by the Message object and by the delivery
  // (consumer, stream, sequence, delivery count). A handler call for one of them outside its
  // batch's thread (middleware that runs the next step on another thread, with the message or a
  // copy of it) would wait for the batch's own row lock or write turn, which waits for it: refused
  // at once instead. Not by event id: another worker may run another copy of the same event (a
  // producer's retry, a replay) at the same moment; that call waits for the batch, then finds the
  // inbox row, and must not be refused.
  std::mutex open_mutex;
  std::multiset<const Message*> open_messages;
  std::multiset<std::string> open_deliveries;

  bool is_open(const Message& message) {
    std::lock_guard lock(open_mutex);
    if (open_messages.count(&message) > 0) return true;
    const std::string id = delivery_id(message);
    return !id.empty() && open_deliveries.count(id) > 0;
  }
  void open(const Message& message) {
    std::lock_guard lock(open_mutex);
    open_messages.insert(&message);
    if (auto id = delivery_id(message); !id.empty()) open_deliveries.insert(std::move(id));
  }
  void close(const Message& message) {
    std::lock_guard lock(open_mutex);
    open_messages.erase(open_messages.find(&message));
    if (auto id = delivery_id(message); !id.empty()) open_deliveries.erase(open_deliveries.find(id));
  }
  // Empty for a message without JetStream metadata (only its address identifies it then).
  static std::string delivery_id(const Message& m) {
    if (m.metadata.stream_sequence == 0) return {};
    return m.metadata.consumer + '\n' + m.metadata.stream + '\n' + std::to_string(m.metadata.stream_sequence) +
           '\n' + std::to_string(m.metadata.deliveries);
  }

  void give_back(Lease lease) {
    std::lock_guard lock(mutex);
    idle.push_back(std::move(lease));
  }
};

namespace {

// The batch run_batch() has open on this thread; operator() runs inside it.
struct BatchScope {
  const void* owner = nullptr;
  detail::InboxBatch* batch = nullptr;
  uint64_t processed = 0;
  uint64_t duplicates = 0;
};
thread_local BatchScope* current_batch = nullptr;

InboxKey key_of(const Message& message) {
  InboxKey key;
  key.consumer = message.metadata.consumer;
  key.event_id = message.envelope.event_id;
  key.subject = message.subject;
  key.stream = message.metadata.stream;
  key.stream_seq = message.metadata.stream_sequence;
  key.deliveries = static_cast<int>(message.metadata.deliveries);
  return key;
}

}  // namespace

InboxHandler::InboxHandler(DatabaseFactory open_database, Fn handler) : state_(std::make_shared<State>()) {
  state_->open_database = std::move(open_database);
  state_->handler = std::move(handler);
}

void InboxHandler::operator()(const Message& message) const {
  auto& s = *state_;
  const InboxKey key = key_of(message);
  if (current_batch != nullptr && current_batch->owner == state_.get()) {
    auto& scope = *current_batch;
    try {
      auto result = scope.batch->process(key, [&](store::Transaction& tx) { s.handler(message, tx); });
      (result == InboxResult::duplicate ? scope.duplicates : scope.processed)++;
    } catch (...) {
      s.failures.fetch_add(1);
      throw;
    }
    return;
  }

  {
    if (s.is_open(message)) {
      s.failures.fetch_add(1);
      throw ConfigError("inbox_handler.max_batch",
                        "the handler of " + key.event_id +
                            " was called on another thread than its batch (middleware that runs the next step on "
                            "another thread?); it would wait for the batch for ever: give this InboxHandler "
                            "max_batch(1)");
    }
  }
  std::unique_lock<std::timed_mutex> turn;
  auto lease = s.take_turn(turn);
  try {
    auto result = lease.second->process(key, [&](store::Transaction& tx) { s.handler(message, tx); });
    (result == InboxResult::duplicate ? s.duplicates : s.processed).fetch_add(1);
  } catch (...) {
    s.failures.fetch_add(1);
    // A connection that failed may be broken: open a fresh one next time rather than reuse it.
    try {
      throw;
    } catch (const store::RetryableDatabaseError&) {
      throw;
    } catch (...) {
      s.give_back(std::move(lease));
      throw;
    }
  }
  s.give_back(std::move(lease));
}

InboxHandler& InboxHandler::max_batch(int max_messages) {
  state_->max_batch = std::clamp(max_messages, 1, kMaxBatchLimit);
  return *this;
}

int InboxHandler::max_batch() const noexcept { return state_->max_batch.load(); }

std::exception_ptr InboxHandler::run_batch(const std::vector<const Message*>& messages,
                                           const std::function<void(std::size_t)>& run) const {
  auto& s = *state_;
  const std::size_t count = messages.size();
  State::Lease lease;
  std::unique_ptr<detail::InboxBatch> batch;
  // An idle connection may have died meanwhile (a database restart): its BEGIN fails before any
  // handler ran, so a fresh connection is tried once before the whole batch fails.
  std::unique_lock<std::timed_mutex> turn;
  for (int attempt = 0;; ++attempt) {
    try {
      lease = s.take_turn(turn);
      batch = detail::begin_inbox_batch(*lease.first);
      break;
    } catch (const store::RetryableDatabaseError&) {
      lease = {};
      if (attempt == 0) continue;
      s.failures.fetch_add(count);
      return std::current_exception();
    } catch (...) {
      s.failures.fetch_add(count);
      return std::current_exception();  // the connection (if any) is dropped
    }
  }
  s.batches.fetch_add(1);
  s.batched.fetch_add(count);

  std::exception_ptr error;
  try {
    std::vector<InboxKey> keys;
    keys.reserve(count);
    for (const auto* m : messages) keys.push_back(key_of(*m));
    batch->reserve(keys);
  } catch (...) {
    // An empty key is refused again, alone, by process(); a database error leaves the batch
    // broken, and every process() then fails without running its handler.
  }

  BatchScope scope;
  scope.owner = state_.get();
  scope.batch = batch.get();
  BatchScope* previous = current_batch;
  current_batch = &scope;
  for (std::size_t i = 0; i < count; ++i) {
    s.open(*messages[i]);
    try {
      run(i);
    } catch (...) {  // run() must not throw; the batch still ends properly if it does
    }
    s.close(*messages[i]);
  }
  current_batch = previous;

  try {
    batch->commit();
  } catch (...) {
    error = std::current_exception();
  }
  const bool reusable = !batch->broken();
  batch.reset();  // rolls back what did not commit
  if (error) {
    s.failures.fetch_add(scope.processed + scope.duplicates);
    // A connection whose batch broke may be gone: open a fresh one next time.
    if (reusable) s.give_back(std::move(lease));
    return error;
  }
  s.processed.fetch_add(scope.processed);
  s.duplicates.fetch_add(scope.duplicates);
  s.give_back(std::move(lease));
  return nullptr;
}

uint64_t InboxHandler::processed() const noexcept { return state_->processed.load(); }
uint64_t InboxHandler::duplicates() const noexcept { return state_->duplicates.load(); }
uint64_t InboxHandler::failures() const noexcept { return state_->failures.load(); }
uint64_t InboxHandler::batches() const noexcept { return state_->batches.load(); }
uint64_t InboxHandler::batched() const noexcept { return state_->batched.load(); }

}  // namespace natspubsub
