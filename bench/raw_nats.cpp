#include "raw_nats.hpp"

#include <stdexcept>

namespace natspubsub::bench {

void check(natsStatus s, const std::string& what) {
  if (s == NATS_OK) return;
  const char* text = nats_GetLastError(nullptr);
  throw std::runtime_error(what + ": " + (text != nullptr && *text ? text : natsStatus_GetText(s)));
}

RawNats::RawNats(const std::string& url, int async_window) {
  natsConnection* nc = nullptr;
  check(natsConnection_ConnectTo(&nc, url.c_str()), "raw connect to " + url);
  nc_.reset(nc);
  jsOptions o;
  jsOptions_Init(&o);
  o.Wait = 10000;
  if (async_window > 0) {
    o.PublishAsync.MaxPending = async_window;
    o.PublishAsync.StallWait = 10000;  // a full window waits for room rather than failing
    o.PublishAsync.AckHandler = &RawNats::on_ack;
    o.PublishAsync.AckHandlerClosure = this;
  }
  jsCtx* js = nullptr;
  check(natsConnection_JetStream(&js, nc, &o), "raw JetStream context");
  js_.reset(js);
}

RawNats::~RawNats() {
  js_.reset();
  if (nc_) natsConnection_Close(nc_.get());
}

void RawNats::on_ack(jsCtx*, natsMsg* msg, jsPubAck* pa, jsPubAckErr*, void* closure) {
  auto* self = static_cast<RawNats*>(closure);
  (pa != nullptr ? self->acked_ : self->failed_).fetch_add(1, std::memory_order_relaxed);
  natsMsg_Destroy(msg);  // with an ack handler the message is ours to destroy
}

void RawNats::publish_sync(const char* subject, const std::string& body, const char* msg_id) {
  natsMsg* raw = nullptr;
  check(natsMsg_Create(&raw, subject, nullptr, body.data(), static_cast<int>(body.size())), "creating message");
  MsgPtr msg(raw);
  check(natsMsgHeader_Set(msg.get(), "Nats-Msg-Id", msg_id), "setting Nats-Msg-Id");
  jsPubAck* ack = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_PublishMsg(&ack, js_.get(), msg.get(), nullptr, &jerr);
  jsPubAck_Destroy(ack);
  check(s, std::string("raw publish to ") + subject);
}

void RawNats::publish_async(const char* subject, const std::string& body, const char* msg_id, const char* header,
                            const char* header_value) {
  natsMsg* raw = nullptr;
  check(natsMsg_Create(&raw, subject, nullptr, body.data(), static_cast<int>(body.size())), "creating message");
  MsgPtr msg(raw);
  if (header != nullptr) check(natsMsgHeader_Set(msg.get(), header, header_value), "setting a header");
  check(natsMsgHeader_Set(msg.get(), "Nats-Msg-Id", msg_id), "setting Nats-Msg-Id");
  natsMsg* handed = msg.get();
  check(js_PublishMsgAsync(js_.get(), &handed, nullptr), std::string("raw async publish to ") + subject);
  msg.release();  // cnats owns it now
}

void RawNats::complete_async() {
  jsPubOptions po;
  jsPubOptions_Init(&po);
  po.MaxWait = 30000;
  check(js_PublishAsyncComplete(js_.get(), &po), "waiting for async acks");
  if (auto failed = failed_.exchange(0); failed > 0)
    throw std::runtime_error("raw async publish: " + std::to_string(failed) + " messages not stored");
}

void RawNats::purge_stream(const std::string& stream) {
  jsErrCode jerr = static_cast<jsErrCode>(0);
  check(js_PurgeStream(js_.get(), stream.c_str(), nullptr, &jerr), "purging " + stream);
}

void RawNats::delete_consumer(const std::string& stream, const std::string& durable) {
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_DeleteConsumer(js_.get(), stream.c_str(), durable.c_str(), nullptr, &jerr);
  if (s != NATS_OK && jerr != JSConsumerNotFoundErr) check(s, "deleting consumer " + durable);
}

RawPullConsumer::RawPullConsumer(RawNats& nats, const std::string& stream, const std::string& filter,
                                 const std::string& durable, int max_ack_pending) {
  jsSubOptions so;
  jsSubOptions_Init(&so);
  so.Stream = stream.c_str();
  so.Config.Durable = durable.c_str();
  so.Config.AckPolicy = js_AckExplicit;
  so.Config.MaxAckPending = max_ack_pending;
  so.Config.AckWait = int64_t{30} * 1000000000;
  natsSubscription* sub = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  check(js_PullSubscribe(&sub, nats.js(), filter.c_str(), durable.c_str(), nullptr, &so, &jerr),
        "raw pull subscribe " + durable);
  sub_.reset(sub);
}

}  // namespace natspubsub::bench
