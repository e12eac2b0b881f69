#include "support/pull_consumer.hpp"

#include <stdexcept>

namespace natspubsub::testing {

PullConsumer::PullConsumer(RawNats& raw, const std::string& stream, const std::string& durable,
                           const std::string& filter)
    : PullConsumer(raw, stream, durable, filter, Options{}) {}

PullConsumer::PullConsumer(RawNats& raw, const std::string& stream, const std::string& durable,
                           const std::string& filter, Options options)
    : raw_(&raw) {
  jsConsumerConfig cc;
  jsConsumerConfig_Init(&cc);
  cc.Durable = durable.c_str();
  cc.FilterSubject = filter.c_str();
  cc.AckPolicy = js_AckExplicit;
  cc.AckWait = static_cast<int64_t>(options.ack_wait.count()) * 1000000;
  cc.MaxDeliver = options.max_deliver;
  jsConsumerInfo* ci = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_AddConsumer(&ci, raw.js(), stream.c_str(), &cc, nullptr, &jerr);
  jsConsumerInfo_Destroy(ci);
  if (s != NATS_OK) throw std::runtime_error("add consumer " + durable + " failed: " + std::to_string(jerr));
  jsSubOptions so;
  jsSubOptions_Init(&so);
  so.Stream = stream.c_str();
  so.Consumer = durable.c_str();
  s = js_PullSubscribe(&sub_, raw.js(), filter.c_str(), durable.c_str(), nullptr, &so, &jerr);
  if (s != NATS_OK) throw std::runtime_error("bind to " + durable + " failed: " + std::to_string(jerr));
}

PullConsumer::~PullConsumer() { natsSubscription_Destroy(sub_); }

uint64_t PullConsumer::publish(const std::string& subject, const std::string& body) {
  jsPubAck* ack = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_Publish(&ack, raw_->js(), subject.c_str(), body.data(), static_cast<int>(body.size()), nullptr,
                            &jerr);
  if (s != NATS_OK) throw std::runtime_error("publish to " + subject + " failed: " + std::to_string(jerr));
  const uint64_t seq = ack->Sequence;
  jsPubAck_Destroy(ack);
  return seq;
}

std::vector<natsMsg*> PullConsumer::fetch(int batch, std::chrono::milliseconds timeout) {
  natsMsgList list{};
  jsFetchRequest req;
  jsFetchRequest_Init(&req);
  req.Batch = batch;
  req.NoWait = true;
  req.Expires = static_cast<int64_t>(timeout.count()) * 1000000;
  std::vector<natsMsg*> out;
  if (natsSubscription_FetchRequest(&list, sub_, &req) == NATS_OK) {
    for (int i = 0; i < list.Count; ++i) {
      out.push_back(list.Msgs[i]);
      list.Msgs[i] = nullptr;
    }
  }
  natsMsgList_Destroy(&list);
  return out;
}

natsMsg* PullConsumer::fetch_one(std::chrono::milliseconds timeout) {
  auto msgs = fetch(1, timeout);
  return msgs.empty() ? nullptr : msgs.front();
}

uint64_t deliveries_of(natsMsg* msg) {
  jsMsgMetaData* meta = nullptr;
  if (natsMsg_GetMetaData(&meta, msg) != NATS_OK) return 0;
  const uint64_t n = meta->NumDelivered;
  jsMsgMetaData_Destroy(meta);
  return n;
}

uint64_t stream_sequence_of(natsMsg* msg) {
  jsMsgMetaData* meta = nullptr;
  if (natsMsg_GetMetaData(&meta, msg) != NATS_OK) return 0;
  const uint64_t n = meta->Sequence.Stream;
  jsMsgMetaData_Destroy(meta);
  return n;
}

}  // namespace natspubsub::testing
