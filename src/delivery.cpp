#include "delivery.hpp"

#include <natspubsub/log.hpp>

namespace natspubsub::detail {

const char* to_string(DeliveryState state) noexcept {
  switch (state) {
    case DeliveryState::received: return "received";
    case DeliveryState::running: return "running";
    case DeliveryState::acked: return "acked";
    case DeliveryState::naked: return "naked";
    case DeliveryState::dead_lettered: return "dead_lettered";
    case DeliveryState::abandoned: return "abandoned";
  }
  return "unknown";
}

Delivery::Delivery(MsgPtr msg, Clock::time_point fetched)
    : fetched_at(fetched), msg_(std::move(msg)), last_progress_(fetched) {}

DeliveryState Delivery::state() const {
  std::lock_guard lock(mutex_);
  return state_;
}

bool Delivery::settled() const {
  std::lock_guard lock(mutex_);
  return !msg_;
}

template <typename Send>
bool Delivery::settle(DeliveryState to, Send&& send) {
  std::lock_guard lock(mutex_);
  if (!msg_) return false;
  send(msg_.get());
  state_ = to;
  msg_.reset();
  return true;
}

bool Delivery::begin(const std::function<void(natsMsg*)>& read) {
  std::lock_guard lock(mutex_);
  if (!msg_) return false;
  read(msg_.get());
  state_ = DeliveryState::running;
  return true;
}

Delivery::AckSent Delivery::ack(natsConnection* nc, const std::function<std::string()>& reply_to) {
  AckSent out;
  out.sent = settle(DeliveryState::acked, [&](natsMsg* msg) {
    const char* ack_subject = natsMsg_GetReply(msg);
    out.reply_to = reply_to();
    out.status = ack_subject == nullptr
                     ? NATS_INVALID_SUBJECT
                     : natsConnection_PublishRequestString(nc, ack_subject, out.reply_to.c_str(), "+ACK");
  });
  return out;
}

bool Delivery::nak(Millis delay) {
  natsStatus status = NATS_OK;
  const bool sent = settle(DeliveryState::naked, [&](natsMsg* msg) {
    status = delay.count() > 0 ? natsMsg_NakWithDelay(msg, delay.count(), nullptr) : natsMsg_Nak(msg, nullptr);
  });
  if (sent && status != NATS_OK)
    logger()->warn("NAK not sent ({}); the message returns after ack_wait", last_error_text(status));
  return sent;
}

bool Delivery::term() {
  natsStatus status = NATS_OK;
  const bool sent = settle(DeliveryState::dead_lettered, [&](natsMsg* msg) { status = natsMsg_Term(msg, nullptr); });
  if (sent && status != NATS_OK)
    logger()->warn("TERM not sent ({}); the message may come once more (its dead letter is deduplicated)",
                   last_error_text(status));
  return sent;
}

bool Delivery::abandon() {
  return settle(DeliveryState::abandoned, [](natsMsg* msg) { natsMsg_Nak(msg, nullptr); });
}

bool Delivery::signal_in_progress(Clock::time_point now, Millis interval, Millis max_in_progress) {
  if (now - last_progress_ < interval) return false;
  if (now - fetched_at >= max_in_progress) return false;  // a hung handler's message is let go
  // A worker holding the lock is settling it right now: no signal needed.
  std::unique_lock lock(mutex_, std::try_to_lock);
  if (!lock || !msg_) return false;
  natsMsg_InProgress(msg_.get(), nullptr);
  last_progress_ = now;
  return true;
}

}  // namespace natspubsub::detail
