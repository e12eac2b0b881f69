#include <natspubsub/inbox_handler.hpp>

#include <atomic>
#include <mutex>
#include <vector>

#include <natspubsub/inbox.hpp>

namespace natspubsub {

struct InboxHandler::State {
  DatabaseFactory open_database;
  Fn handler;
  std::mutex mutex;
  // Idle connections with their inbox; a worker takes one, uses it alone, gives it back.
  std::vector<std::pair<std::unique_ptr<store::Database>, std::unique_ptr<Inbox>>> idle;
  std::atomic<uint64_t> processed{0};
  std::atomic<uint64_t> duplicates{0};
  std::atomic<uint64_t> failures{0};
};

InboxHandler::InboxHandler(DatabaseFactory open_database, Fn handler) : state_(std::make_shared<State>()) {
  state_->open_database = std::move(open_database);
  state_->handler = std::move(handler);
}

void InboxHandler::operator()(const Message& message) const {
  auto& s = *state_;
  std::pair<std::unique_ptr<store::Database>, std::unique_ptr<Inbox>> lease;
  {
    std::lock_guard lock(s.mutex);
    if (!s.idle.empty()) {
      lease = std::move(s.idle.back());
      s.idle.pop_back();
    }
  }
  if (!lease.first) {
    lease.first = s.open_database();
    lease.second = make_inbox(*lease.first);
  }
  InboxKey key;
  key.consumer = message.metadata.consumer;
  key.event_id = message.envelope.event_id;
  key.subject = message.subject;
  key.stream = message.metadata.stream;
  key.stream_seq = message.metadata.stream_sequence;
  key.deliveries = static_cast<int>(message.metadata.deliveries);
  auto give_back = [&] {
    std::lock_guard lock(s.mutex);
    s.idle.push_back(std::move(lease));
  };
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
      give_back();
      throw;
    }
  }
  give_back();
}

uint64_t InboxHandler::processed() const noexcept { return state_->processed.load(); }
uint64_t InboxHandler::duplicates() const noexcept { return state_->duplicates.load(); }
uint64_t InboxHandler::failures() const noexcept { return state_->failures.load(); }

}  // namespace natspubsub
