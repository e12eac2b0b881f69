#pragma once
// The baselines: what a careful programmer writes with cnats alone to do the same job.
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nats/nats.h>

namespace natspubsub::bench {

template <typename T, void (*Destroy)(T*)>
struct Deleter {
  void operator()(T* p) const noexcept {
    if (p != nullptr) Destroy(p);
  }
};
using NcPtr = std::unique_ptr<natsConnection, Deleter<natsConnection, natsConnection_Destroy>>;
using JsPtr = std::unique_ptr<jsCtx, Deleter<jsCtx, jsCtx_Destroy>>;
using MsgPtr = std::unique_ptr<natsMsg, Deleter<natsMsg, natsMsg_Destroy>>;
using SubPtr = std::unique_ptr<natsSubscription, Deleter<natsSubscription, natsSubscription_Destroy>>;

/// Throws std::runtime_error naming `what` when s is not NATS_OK.
void check(natsStatus s, const std::string& what);

/// One cnats connection with a JetStream context. With `async_window` > 0 the context publishes
/// asynchronously with at most that many messages in flight (cnats' own MaxPending stall) and
/// counts acknowledgements in an ack handler, as a program needing per-message outcomes must.
class RawNats {
 public:
  explicit RawNats(const std::string& url, int async_window = 0);
  ~RawNats();
  RawNats(const RawNats&) = delete;
  RawNats& operator=(const RawNats&) = delete;

  [[nodiscard]] natsConnection* nc() const { return nc_.get(); }
  [[nodiscard]] jsCtx* js() const { return js_.get(); }

  /// Publishes one message with a Nats-Msg-Id header and waits for its PubAck.
  void publish_sync(const char* subject, const std::string& body, const char* msg_id);
  /// Async publish (async_window > 0): returns once the message is handed to cnats.
  void publish_async(const char* subject, const std::string& body, const char* msg_id,
                     const char* header = nullptr, const char* header_value = nullptr);
  /// Waits for every outstanding ack; throws if any message was not stored.
  void complete_async();

  void purge_stream(const std::string& stream);
  void delete_consumer(const std::string& stream, const std::string& durable);

 private:
  static void on_ack(jsCtx*, natsMsg* msg, jsPubAck* pa, jsPubAckErr* pae, void* closure);

  NcPtr nc_;
  JsPtr js_;
  std::atomic<uint64_t> acked_{0};
  std::atomic<uint64_t> failed_{0};
};

/// A hand-written pull consumer on a durable it creates: fetch a batch (NoWait with an expiry,
/// as the library does, so a lone message is not held back), then ack each message.
class RawPullConsumer {
 public:
  RawPullConsumer(RawNats& nats, const std::string& stream, const std::string& filter, const std::string& durable,
                  int max_ack_pending = 1000);
  /// Fetches up to `batch` messages (waiting up to `expires_ms` for the first), calls `on_message`
  /// for each and acks it (async ack unless `ack_sync`). Returns how many came.
  template <typename F>
  int fetch(int batch, int64_t expires_ms, bool ack_sync, F&& on_message) {
    natsMsgList list{};
    jsFetchRequest req;
    jsFetchRequest_Init(&req);
    req.Batch = batch;
    req.NoWait = true;
    req.Expires = expires_ms * 1000000;
    natsStatus s = natsSubscription_FetchRequest(&list, sub_.get(), &req);
    if (s == NATS_TIMEOUT || s == NATS_NOT_FOUND) return 0;
    check(s, "raw fetch");
    for (int i = 0; i < list.Count; ++i) {
      on_message(list.Msgs[i]);
      check(ack_sync ? natsMsg_AckSync(list.Msgs[i], nullptr, nullptr) : natsMsg_Ack(list.Msgs[i], nullptr), "raw ack");
    }
    const int n = list.Count;
    natsMsgList_Destroy(&list);
    return n;
  }

 private:
  SubPtr sub_;
};

}  // namespace natspubsub::bench
