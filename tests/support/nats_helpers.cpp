#include "support/nats_helpers.hpp"

#include <chrono>
#include <thread>

#include <cstdlib>
#include <stdexcept>

namespace natspubsub::testing {

Config test_config(const std::string& url, const std::string& app, const std::string& env) {
  auto c = Config::testing(app);
  c.env = env;
  c.servers = {url};
  return c;
}

RawNats::RawNats(const std::string& url) {
  if (natsConnection_ConnectTo(&nc_, url.c_str()) != NATS_OK) throw std::runtime_error("raw connect to " + url + " failed");
  if (natsConnection_JetStream(&js_, nc_, nullptr) != NATS_OK) {
    natsConnection_Destroy(nc_);
    throw std::runtime_error("raw JetStream context failed");
  }
}

RawNats::~RawNats() {
  jsCtx_Destroy(js_);
  natsConnection_Destroy(nc_);
}

DurableState RawNats::durable_state(const std::string& stream, const std::string& durable) {
  jsConsumerInfo* ci = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  if (js_GetConsumerInfo(&ci, js_, stream.c_str(), durable.c_str(), nullptr, &jerr) != NATS_OK)
    throw std::runtime_error("no consumer " + durable + " on stream " + stream);
  DurableState s{static_cast<uint64_t>(ci->NumAckPending), ci->NumPending, static_cast<uint64_t>(ci->NumRedelivered),
                 ci->AckFloor.Stream, ci->Config->MaxDeliver};
  jsConsumerInfo_Destroy(ci);
  return s;
}

uint64_t RawNats::stream_messages(const std::string& stream) {
  jsStreamInfo* si = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  if (js_GetStreamInfo(&si, js_, stream.c_str(), nullptr, &jerr) != NATS_OK)
    throw std::runtime_error("no stream " + stream);
  uint64_t n = si->State.Msgs;
  jsStreamInfo_Destroy(si);
  return n;
}

std::vector<StoredMessage> RawNats::read_stream(const std::string& stream) {
  jsStreamInfo* si = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  if (js_GetStreamInfo(&si, js_, stream.c_str(), nullptr, &jerr) != NATS_OK)
    throw std::runtime_error("no stream " + stream);
  uint64_t first = si->State.FirstSeq;
  uint64_t last = si->State.LastSeq;
  jsStreamInfo_Destroy(si);
  std::vector<StoredMessage> out;
  for (uint64_t seq = first; seq != 0 && seq <= last; ++seq) {
    natsMsg* msg = nullptr;
    // Not found: deleted. Any other failure (a timeout while a cluster elects a leader) is asked
    // again, and a message that still cannot be read fails the caller instead of looking lost.
    natsStatus s = NATS_OK;
    for (int attempt = 0; attempt < 20; ++attempt) {
      s = js_GetMsg(&msg, js_, stream.c_str(), seq, nullptr, &jerr);
      if (s == NATS_OK || s == NATS_NOT_FOUND || jerr == JSNoMessageFoundErr) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
    }
    if (s == NATS_NOT_FOUND || jerr == JSNoMessageFoundErr) continue;
    if (s != NATS_OK)
      throw std::runtime_error("reading message " + std::to_string(seq) + " of stream " + stream + " failed: " +
                               natsStatus_GetText(s));
    StoredMessage m;
    m.subject = natsMsg_GetSubject(msg);
    m.data.assign(natsMsg_GetData(msg), static_cast<size_t>(natsMsg_GetDataLength(msg)));
    m.sequence = seq;
    const char** keys = nullptr;
    int count = 0;
    if (natsMsgHeader_Keys(msg, &keys, &count) == NATS_OK) {
      for (int i = 0; i < count; ++i) {
        const char* v = nullptr;
        natsMsgHeader_Get(msg, keys[i], &v);
        m.headers.emplace_back(keys[i], v != nullptr ? v : "");
        if (std::string(keys[i]) == "Nats-Msg-Id") m.msg_id = v != nullptr ? v : "";
        if (std::string(keys[i]) == "topic") m.topic = v != nullptr ? v : "";
      }
      free(static_cast<void*>(keys));
    }
    natsMsg_Destroy(msg);
    out.push_back(std::move(m));
  }
  return out;
}

void RawNats::add_stream(const std::string& name, const std::vector<std::string>& subjects, int replicas,
                         int32_t max_msg_size) {
  std::vector<const char*> subs;
  for (const auto& s : subjects) subs.push_back(s.c_str());
  jsStreamConfig cfg;
  jsStreamConfig_Init(&cfg);
  cfg.Name = name.c_str();
  cfg.Subjects = subs.data();
  cfg.SubjectsLen = static_cast<int>(subs.size());
  cfg.Replicas = replicas;
  if (max_msg_size > 0) cfg.MaxMsgSize = max_msg_size;
  jsStreamInfo* si = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_AddStream(&si, js_, &cfg, nullptr, &jerr);
  jsStreamInfo_Destroy(si);
  if (s != NATS_OK) throw std::runtime_error("add stream " + name + " failed: " + std::to_string(jerr));
}

}  // namespace natspubsub::testing
