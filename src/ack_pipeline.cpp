#include "ack_pipeline.hpp"

#include <cstdlib>
#include <cstring>
#include <vector>

#include <natspubsub/connection.hpp>
#include <natspubsub/log.hpp>

namespace natspubsub::detail {
namespace {

void on_ack_reply(natsConnection*, natsSubscription*, natsMsg* msg, void* closure) {
  auto& tracker = **static_cast<std::shared_ptr<AckTracker>*>(closure);
  const bool refused = natsMsg_IsNoResponders(msg);
  tracker.settle(natsMsg_GetSubject(msg), !refused, "no responders (the consumer is gone)");
  natsMsg_Destroy(msg);
}

void on_ack_replies_complete(void* closure) { delete static_cast<std::shared_ptr<AckTracker>*>(closure); }

std::string new_inbox(const std::string& durable) {
  natsInbox* inbox = nullptr;
  check(natsInbox_Create(&inbox), "creating the ack inbox of " + durable);
  std::string out = inbox;
  natsInbox_Destroy(inbox);
  return out;
}

}  // namespace

AckTracker::AckTracker(std::string durable, std::string inbox, Millis timeout)
    : durable_(std::move(durable)), inbox_(std::move(inbox)), timeout_(timeout) {}

std::string AckTracker::add(std::string event_id, uint64_t sequence) {
  std::lock_guard lock(mutex_);
  const uint64_t id = ++next_id_;
  pending_.emplace(id, Pending{std::move(event_id), sequence, Clock::now() + timeout_});
  return inbox_ + "." + std::to_string(id);
}

void AckTracker::settle(const char* subject, bool ok, const char* why) {
  const size_t prefix = inbox_.size() + 1;
  if (subject == nullptr || std::strlen(subject) <= prefix) return;
  const uint64_t id = std::strtoull(subject + prefix, nullptr, 10);
  Pending p;
  {
    std::lock_guard lock(mutex_);
    auto it = pending_.find(id);
    if (it == pending_.end()) return;  // already expired
    p = std::move(it->second);
    pending_.erase(it);
    // Counted before wait_all() can return: stop() and stats() then see every answer.
    (ok ? confirmed_ : failed_)++;
    if (pending_.empty()) empty_.notify_all();
  }
  if (!ok) {
    logger()->warn("{}: ack of {} (seq {}) not confirmed: {}; it will be delivered again", durable_, p.event_id,
                   p.sequence, why);
  }
}

void AckTracker::expire(Clock::time_point now, bool all) {
  std::vector<Pending> late;
  {
    std::lock_guard lock(mutex_);
    for (auto it = pending_.begin(); it != pending_.end();) {
      if (all || it->second.deadline <= now) {
        late.push_back(std::move(it->second));
        it = pending_.erase(it);
      } else {
        ++it;
      }
    }
    failed_ += late.size();
    if (pending_.empty()) empty_.notify_all();
  }
  for (const auto& p : late)
    logger()->warn("{}: ack of {} (seq {}) not confirmed within {} ms; it will be delivered again", durable_,
                   p.event_id, p.sequence, timeout_.count());
}

bool AckTracker::wait_all(Clock::time_point until) {
  std::unique_lock lock(mutex_);
  return empty_.wait_until(lock, until, [&] { return pending_.empty(); });
}

size_t AckTracker::pending() const {
  std::lock_guard lock(mutex_);
  return pending_.size();
}

AckPipeline::AckPipeline(Connection& connection, std::string durable, Millis timeout)
    : connection_(&connection) {
  tracker_ = std::make_shared<AckTracker>(durable, new_inbox(durable), timeout);
  const std::string wildcard = tracker_->inbox() + ".*";
  auto* holder = new std::shared_ptr<AckTracker>(tracker_);
  natsSubscription* replies = nullptr;
  const natsStatus status =
      natsConnection_Subscribe(&replies, connection.native(), wildcard.c_str(), on_ack_reply, holder);
  if (status != NATS_OK) {
    delete holder;  // no subscription, so no completion callback will free it
    check(status, "subscribing to the ack answers of " + durable);
  }
  replies_.reset(replies);
  if (natsSubscription_SetOnCompleteCB(replies, on_ack_replies_complete, holder) != NATS_OK)
    logger()->warn("{}: completion callback not set; a few bytes stay allocated", durable);
}

void AckPipeline::ack(Delivery& d, std::string event_id, uint64_t sequence) {
  const auto sent = d.ack(connection_->native(), [&] { return tracker_->add(std::move(event_id), sequence); });
  if (!sent.reply_to.empty() && sent.status != NATS_OK)
    tracker_->settle(sent.reply_to.c_str(), false, last_error_text(sent.status).c_str());
}

}  // namespace natspubsub::detail
