#include "delivery_queue.hpp"

#include <algorithm>

namespace natspubsub::detail {

DeliveryQueue::DeliveryQueue(int capacity) : capacity_(capacity) {}

bool DeliveryQueue::wants_fetch() const {
  const int free = capacity_ - static_cast<int>(outstanding_.size());
  return free > 0 && (free >= std::max(1, capacity_ / 2) || queue_.empty());
}

int DeliveryQueue::wait_for_room(const std::stop_token& st, Millis max_wait) {
  std::unique_lock lock(mutex_);
  cv_.wait_for(lock, max_wait, [&] { return st.stop_requested() || wants_fetch(); });
  return capacity_ - static_cast<int>(outstanding_.size());
}

void DeliveryQueue::push(std::vector<DeliveryPtr> deliveries) {
  const size_t count = deliveries.size();
  {
    std::lock_guard lock(mutex_);
    for (auto& d : deliveries) {
      queue_.push_back(d);
      outstanding_.insert(std::move(d));
    }
  }
  // As many workers as there are new deliveries, not every thread of the subscription.
  if (count == 1)
    work_cv_.notify_one();
  else if (count > 1)
    work_cv_.notify_all();
}

void DeliveryQueue::pause(const std::stop_token& st, Millis duration) {
  std::unique_lock lock(mutex_);
  cv_.wait_for(lock, duration, [&] { return st.stop_requested(); });
}

DeliveryPtr DeliveryQueue::take(const std::stop_token& st, Millis max_wait) {
  std::unique_lock lock(mutex_);
  work_cv_.wait_for(lock, max_wait, [&] { return st.stop_requested() || (accepting_ && !queue_.empty()); });
  if (st.stop_requested() || !accepting_ || queue_.empty()) return nullptr;
  DeliveryPtr d = std::move(queue_.front());
  queue_.pop_front();
  running_++;
  return d;
}

std::vector<DeliveryPtr> DeliveryQueue::take_queued(size_t max) {
  std::vector<DeliveryPtr> out;
  std::lock_guard lock(mutex_);
  if (!accepting_) return out;
  while (out.size() < max && !queue_.empty()) {
    out.push_back(std::move(queue_.front()));
    queue_.pop_front();
    running_++;
  }
  return out;
}

void DeliveryQueue::finish(const DeliveryPtr& d) {
  bool wake = false;
  {
    std::lock_guard lock(mutex_);
    running_--;
    outstanding_.erase(d);
    wake = running_ == 0 || !accepting_ || wants_fetch();  // the fetcher, or stop()
  }
  if (wake) cv_.notify_all();
}

void DeliveryQueue::close() {
  std::lock_guard lock(mutex_);
  accepting_ = false;
}

std::deque<DeliveryPtr> DeliveryQueue::take_unstarted(uint64_t& running) {
  std::deque<DeliveryPtr> unstarted;
  std::lock_guard lock(mutex_);
  unstarted.swap(queue_);
  for (const auto& d : unstarted) outstanding_.erase(d);
  running = static_cast<uint64_t>(running_);
  return unstarted;
}

bool DeliveryQueue::wait_idle(Clock::time_point until) {
  std::unique_lock lock(mutex_);
  return cv_.wait_until(lock, until, [&] { return running_ == 0; });
}

void DeliveryQueue::wake_all() {
  cv_.notify_all();
  work_cv_.notify_all();
}

DeliveryQueue::Counts DeliveryQueue::counts() const {
  std::lock_guard lock(mutex_);
  return Counts{outstanding_.size(), running_};
}

std::vector<DeliveryPtr> DeliveryQueue::outstanding() const {
  std::lock_guard lock(mutex_);
  return {outstanding_.begin(), outstanding_.end()};
}

}  // namespace natspubsub::detail
