#include "dead_letter_stream.hpp"

#include <cstdlib>
#include <memory>

#include <nats/nats.h>

#include <natspubsub/subject.hpp>
#include <natspubsub/topology.hpp>

namespace natspubsub::workers {
namespace {

using MsgPtr = std::unique_ptr<natsMsg, decltype(&natsMsg_Destroy)>;
using SubPtr = std::unique_ptr<natsSubscription, decltype(&natsSubscription_Destroy)>;

Headers headers_of(natsMsg* msg) {
  Headers h;
  const char** keys = nullptr;
  int count = 0;
  if (natsMsgHeader_Keys(msg, &keys, &count) == NATS_OK) {
    for (int i = 0; i < count; ++i) {
      const char* v = nullptr;
      if (natsMsgHeader_Get(msg, keys[i], &v) == NATS_OK && v != nullptr) h[keys[i]] = v;
    }
    free(static_cast<void*>(keys));
  }
  return h;
}

std::string body_of(natsMsg* msg) {
  const char* data = natsMsg_GetData(msg);
  return data == nullptr ? std::string() : std::string(data, static_cast<size_t>(natsMsg_GetDataLength(msg)));
}

std::string status_text(natsStatus s) {
  const char* last = nats_GetLastError(nullptr);
  return last != nullptr && *last != '\0' ? last : natsStatus_GetText(s);
}

}  // namespace

std::string topic_of(const DeadLetter& l) {
  if (auto it = l.headers.find("topic"); it != l.headers.end() && !it->second.empty()) return it->second;
  const auto& s = l.original_subject;
  auto first = s.find('.');
  auto second = first == std::string::npos ? first : s.find('.', first + 1);
  return second == std::string::npos ? s : s.substr(second + 1);
}

DeadLetterStream DeadLetterStream::locate(Connection& nats, const Config& config) {
  const std::string filter = "dlq." + config.env + "." + config.app + ".>";
  const std::string expected = config.dlq_stream_name();
  Topology topology(nats);
  std::optional<StreamSummary> found;
  for (auto& s : topology.streams()) {
    bool covers = false;
    for (const auto& subject : s.subjects) covers = covers || subject::covers(subject, filter);
    if (!covers) continue;
    if (!found || s.name == expected) found = s;
  }
  if (!found)
    throw DlqStreamMissing("no stream holds " + filter + " (looked for " + expected +
                           " or any stream capturing those subjects); check --env and --app (" + config.env + ", " +
                           config.app + ")");
  return DeadLetterStream(nats, found->name, filter, found->messages);
}

DlqEntry DeadLetterStream::entry(uint64_t seq, std::string subject, std::string body, Headers headers) const {
  DlqEntry e;
  e.seq = seq;
  e.subject = std::move(subject);
  try {
    e.letter = parse_dead_letter(e.subject, body, headers);
    e.topic = topic_of(*e.letter);
  } catch (const DlqFormatError& err) {
    e.problem = err.what();
  }
  return e;
}

void DeadLetterStream::scan(const std::function<bool(DlqEntry&&)>& visit,
                            const std::function<void(uint64_t, uint64_t)>& progress) const {
  // The count and end are read now: letters written during the scan are not waited for.
  const auto info = Topology(*nats_).stream_info(name_);
  if (info.messages == 0) return;
  jsSubOptions so;
  jsSubOptions_Init(&so);
  so.Stream = name_.c_str();
  so.Ordered = true;  // an ephemeral push consumer with flow control: the server streams the letters
  so.Config.DeliverPolicy = js_DeliverAll;
  natsSubscription* raw = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_SubscribeSync(&raw, nats_->jetstream(), filter_.c_str(), nullptr, &so, &jerr);
  SubPtr sub(raw, natsSubscription_Destroy);
  if (s != NATS_OK) throw NatsError("reading " + name_ + ": " + status_text(s), s, jerr);
  natsSubscription_SetPendingLimits(raw, -1, -1);

  uint64_t done = 0;
  int quiet = 0;
  while (true) {
    natsMsg* m = nullptr;
    s = natsSubscription_NextMsg(&m, raw, 2000);
    if (s == NATS_TIMEOUT) {
      // Nothing for 2 s: done if the stream holds nothing after what we saw (letters deleted
      // meanwhile), else keep waiting a bounded while.
      if (++quiet >= 5) throw TimeoutError("reading " + name_ + ": no message for 10 s", s);
      const auto now = Topology(*nats_).stream_info(name_);
      if (now.messages == 0 || now.last_sequence <= done) return;
      continue;
    }
    if (s != NATS_OK) throw NatsError("reading " + name_ + ": " + status_text(s), s);
    quiet = 0;
    MsgPtr msg(m, natsMsg_Destroy);
    jsMsgMetaData* meta = nullptr;
    if (natsMsg_GetMetaData(&meta, m) != NATS_OK) continue;  // a control message
    const uint64_t seq = meta->Sequence.Stream;
    const uint64_t pending = meta->NumPending;
    jsMsgMetaData_Destroy(meta);
    done = seq;
    if (!visit(entry(seq, natsMsg_GetSubject(m), body_of(m), headers_of(m)))) return;
    if (progress) progress(seq - info.first_sequence + 1, info.last_sequence - info.first_sequence + 1);
    if (pending == 0 || seq >= info.last_sequence) return;
  }
}

std::optional<DlqEntry> DeadLetterStream::get(uint64_t seq) const {
  natsMsg* raw = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_GetMsg(&raw, nats_->jetstream(), name_.c_str(), seq, nullptr, &jerr);
  MsgPtr msg(raw, natsMsg_Destroy);
  if (s == NATS_NOT_FOUND || jerr == JSNoMessageFoundErr) return std::nullopt;
  if (s != NATS_OK) throw NatsError("reading " + name_ + " sequence " + std::to_string(seq) + ": " + status_text(s), s, jerr);
  std::string subject = natsMsg_GetSubject(raw);
  if (subject.rfind(filter_.substr(0, filter_.size() - 1), 0) != 0) return std::nullopt;  // not a DLQ subject
  return entry(seq, std::move(subject), body_of(raw), headers_of(raw));
}

void DeadLetterStream::remove(uint64_t seq) const {
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_DeleteMsg(nats_->jetstream(), name_.c_str(), seq, nullptr, &jerr);
  if (s != NATS_OK)
    throw NatsError("deleting " + name_ + " sequence " + std::to_string(seq) + ": " + status_text(s), s, jerr);
}

OriginalMessage read_original(Connection& nats, const DeadLetter& letter) {
  const auto& c = letter.context;
  const std::string where = c.stream + " sequence " + std::to_string(c.sequence);
  if (c.stream.empty() || c.sequence == 0)
    throw DlqFormatError("its body was left out and it names no original (stream, sequence)");
  natsMsg* raw = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_GetMsg(&raw, nats.jetstream(), c.stream.c_str(), c.sequence, nullptr, &jerr);
  MsgPtr msg(raw, natsMsg_Destroy);
  if (s != NATS_OK)
    throw DlqFormatError("its body was left out and the original at " + where + " cannot be read (" +
                         status_text(s) + "): not replayed");
  const std::string subject = natsMsg_GetSubject(raw);
  if (subject != letter.original_subject)
    throw DlqFormatError("its body was left out and " + where + " is another message (subject " + subject +
                         ", not " + letter.original_subject + "): not replayed");
  OriginalMessage out;
  out.body = body_of(raw);
  out.headers = headers_of(raw);
  auto want = letter.headers.find("Nats-Msg-Id");
  auto have = out.headers.find("Nats-Msg-Id");
  if (want != letter.headers.end() && (have == out.headers.end() || have->second != want->second))
    throw DlqFormatError("its body was left out and " + where + " is another message (Nats-Msg-Id differs): not replayed");
  return out;
}

}  // namespace natspubsub::workers
