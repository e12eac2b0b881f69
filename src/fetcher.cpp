#include "fetcher.hpp"

#include <algorithm>
#include <chrono>
#include <vector>

#include <natspubsub/log.hpp>

#include "nats_util.hpp"

namespace natspubsub::detail {
namespace {

using Clock = std::chrono::steady_clock;

// Every wait here is bounded by this, so a missed notification costs at most this much.
constexpr Millis kIdleWait{100};
// After a failed fetch (connection down, consumer deleted) before trying again.
constexpr Millis kFetchErrorPause{500};

int64_t to_nanos(Millis m) { return m.count() * 1000000; }

}  // namespace

Fetcher::Fetcher(natsSubscription* pull, DeliveryQueue& queue, Options options)
    : pull_(pull), queue_(&queue), options_(std::move(options)) {}

void Fetcher::start() {
  thread_ = std::jthread([this](std::stop_token st) { run(st); });
}

bool Fetcher::limit(int& batch, const std::stop_token& st) {
  Millis pause{0};
  const auto& breaker = options_.breaker;
  if (breaker) {
    const auto state = breaker->state();
    if (state == CircuitState::open) pause = std::max(Millis{1}, std::min(breaker->retry_after(), kIdleWait));
    if (state == CircuitState::half_open) batch = std::min(batch, breaker->options().half_open_probes);
  }
  if (pause.count() == 0 && options_.limiter) {
    const int granted = options_.limiter->acquire_up_to(batch);
    if (granted == 0) pause = std::clamp(options_.limiter->wait_time(1), Millis{1}, kIdleWait);
    else batch = granted;
  }
  if (pause.count() == 0) return true;
  queue_->pause(st, pause);
  return false;
}

void Fetcher::enqueue(natsMsgList& list) {
  const auto now = Clock::now();
  std::vector<DeliveryPtr> fetched;
  fetched.reserve(static_cast<size_t>(std::max(0, list.Count)));
  for (int i = 0; i < list.Count; ++i) {
    if (list.Msgs[i] == nullptr) continue;
    fetched.push_back(std::make_shared<Delivery>(MsgPtr(list.Msgs[i]), now));
    list.Msgs[i] = nullptr;  // ours now; natsMsgList_Destroy skips it
  }
  natsMsgList_Destroy(&list);
  received_ += fetched.size();
  queue_->push(std::move(fetched));
}

void Fetcher::run(const std::stop_token& st) {
  auto last_error_log = Clock::time_point{};
  while (!st.stop_requested()) {
    int free = queue_->wait_for_room(st, kIdleWait);
    if (st.stop_requested()) break;
    if (free <= 0) continue;
    if (!limit(free, st)) continue;

    // NoWait with an expiry (nats-server >= 2.9): the pull waits up to fetch_timeout for the
    // first message, then returns what is there, up to the free slots. A plain waiting pull
    // would hold a lone message back until the whole batch fills or the pull expires.
    natsMsgList list{};
    jsFetchRequest req;
    jsFetchRequest_Init(&req);
    req.Batch = free;
    req.NoWait = true;
    req.Expires = to_nanos(options_.fetch_timeout);
    const auto pulled_at = Clock::now();
    const natsStatus status = natsSubscription_FetchRequest(&list, pull_, &req);
    // Tokens for messages the pull did not bring go back to the bucket.
    if (options_.limiter) options_.limiter->release(free - (status == NATS_OK ? list.Count : 0));
    if (status == NATS_OK) {
      enqueue(list);
      continue;
    }
    natsMsgList_Destroy(&list);
    if (status == NATS_TIMEOUT || status == NATS_NOT_FOUND) {
      // An empty answer long before the expiry (a server that ignores the expiry of a NoWait
      // pull) must not turn this loop into a busy poll.
      if (Clock::now() - pulled_at < options_.fetch_timeout / 2) queue_->pause(st, kIdleWait);
      continue;
    }
    if (Clock::now() - last_error_log > std::chrono::seconds(10)) {
      last_error_log = Clock::now();
      logger()->warn("{}: fetch failed: {}; retrying", options_.durable, last_error_text(status));
    }
    queue_->pause(st, kFetchErrorPause);
  }
}

}  // namespace natspubsub::detail
