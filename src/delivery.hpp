#pragma once
// One fetched JetStream message from fetch to verdict. Every change of its state, and every
// verdict sent for it (ack, NAK, TERM, in-progress), goes through this class. Not installed.
//
//   received ──begin()──▶ running ──ack()──────▶ acked
//      │                     ├──nak()──────▶ naked
//      │                     ├──term()─────▶ dead_lettered   (after the DLQ stored its letter)
//      │                     └──abandon()──▶ abandoned       (stop() deadline; the handler still runs)
//      └── nak() / abandon() (stop(): fetched, never started)
//
// Once a verdict is sent the natsMsg is released: nothing more can be sent for it, and each
// verdict call after the first returns false. Test: tests/delivery_test.cpp.
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include <nats/nats.h>

#include <natspubsub/config.hpp>

#include "nats_util.hpp"

namespace natspubsub::detail {

enum class DeliveryState {
  received,       ///< fetched; no worker read it yet
  running,        ///< a worker read it (begin()) and runs its handler
  acked,          ///< "+ACK" sent
  naked,          ///< "-NAK" sent, with or without a delay
  dead_lettered,  ///< "+TERM" sent (the DLQ stored its letter)
  abandoned,      ///< "-NAK" sent by stop() past its deadline; a handler may still be running
};
[[nodiscard]] const char* to_string(DeliveryState state) noexcept;

class Delivery {
 public:
  using Clock = std::chrono::steady_clock;

  /// What ack() did.
  struct AckSent {
    bool sent = false;          ///< false: a verdict was sent before, nothing was sent now
    std::string reply_to;       ///< the reply subject the server answers on
    natsStatus status = NATS_OK;
  };

  Delivery(MsgPtr msg, Clock::time_point fetched_at);
  Delivery(const Delivery&) = delete;
  Delivery& operator=(const Delivery&) = delete;

  [[nodiscard]] DeliveryState state() const;
  /// A verdict was sent (acked, naked, dead_lettered, abandoned).
  [[nodiscard]] bool settled() const;

  /// received -> running: calls `read` with the message, under the lock (cnats does not lock a
  /// message). False, without calling `read`, when a verdict was sent already.
  bool begin(const std::function<void(natsMsg*)>& read);

  /// -> acked: publishes "+ACK" on `nc` with the reply subject `reply_to()` returns (called only
  /// when the ack is sent). A message without a reply subject counts as sent with
  /// NATS_INVALID_SUBJECT.
  AckSent ack(natsConnection* nc, const std::function<std::string()>& reply_to);
  /// -> naked: "-NAK", with `delay` when it is above 0. Logs a NAK cnats did not send.
  bool nak(Millis delay);
  /// -> dead_lettered: "+TERM". Logs a TERM cnats did not send.
  bool term();
  /// -> abandoned: "-NAK" without delay, its status ignored.
  bool abandon();

  /// "+WPI" when `interval` passed since the last one (or the fetch) and `max_in_progress` has
  /// not passed since the fetch. Skips a message whose lock a worker holds. True when sent.
  /// Called from one thread only (the ticker).
  bool signal_in_progress(Clock::time_point now, Millis interval, Millis max_in_progress);

  const Clock::time_point fetched_at;

 private:
  // Sends one verdict, moving to `to`, unless one was sent already.
  template <typename Send>
  bool settle(DeliveryState to, Send&& send);

  mutable std::mutex mutex_;
  MsgPtr msg_;  // released once settled
  DeliveryState state_ = DeliveryState::received;
  Clock::time_point last_progress_;  // signal_in_progress() only
};

using DeliveryPtr = std::shared_ptr<Delivery>;

}  // namespace natspubsub::detail
