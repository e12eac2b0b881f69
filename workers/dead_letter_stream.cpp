#include "dead_letter_stream.hpp"

#include <algorithm>
#include <cstdlib>
#include <memory>

#include <nats/nats.h>

#include <natspubsub/envelope.hpp>
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

const char* to_string(DlqFormat format) noexcept {
  return format == DlqFormat::natspubsub_js ? "natspubsub-js" : "natspubsub";
}

std::vector<DeadLetterStream> DeadLetterStream::locate_all(Connection& nats, const Config& config) {
  const std::string filter = "dlq." + config.env + "." + config.app + ".>";
  const std::string expected = config.dlq_stream_name();
  // NatsPubsub's: stream "{env}-events-stream-dlq", subject "{env}.{app}.dlq". Only that name:
  // an events stream on "{env}.{app}.>" captures the subject too, but holds no letters.
  const std::string js_name = config.env + "-events-stream-dlq";
  const std::string js_subject = config.env + "." + config.app + ".dlq";
  auto covers = [](const StreamSummary& s, const std::string& subject) {
    return std::any_of(s.subjects.begin(), s.subjects.end(),
                       [&](const auto& mine) { return subject::covers(mine, subject); });
  };
  std::optional<StreamSummary> ours, theirs;
  for (auto& s : Topology(nats).streams()) {
    if (covers(s, filter) && (!ours || s.name == expected)) ours = s;
    if (s.name == js_name && covers(s, js_subject)) theirs = s;
  }
  std::vector<DeadLetterStream> out;
  if (ours) out.push_back(DeadLetterStream(nats, ours->name, filter, ours->messages, DlqFormat::natspubsub));
  if (theirs)
    out.push_back(DeadLetterStream(nats, theirs->name, js_subject, theirs->messages, DlqFormat::natspubsub_js));
  if (out.empty())
    throw DlqStreamMissing("no stream holds " + filter + " (looked for " + expected +
                           " or any stream capturing those subjects, and for NatsPubsub's " + js_name + " on " +
                           js_subject + "); check --env and --app (" + config.env + ", " + config.app + ")");
  return out;
}

bool DeadLetterStream::holds(const std::string& subject) const { return subject::matches(filter_, subject); }

DlqEntry DeadLetterStream::entry(uint64_t seq, std::string subject, std::string body, Headers headers) const {
  DlqEntry e;
  e.stream = name_;
  e.format = format_;
  e.seq = seq;
  e.subject = std::move(subject);
  try {
    e.letter = format_ == DlqFormat::natspubsub_js ? parse_natspubsub_js_letter(e.subject, body, headers)
                                                   : parse_dead_letter(e.subject, body, headers);
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
  // How many messages under our subjects the server will send (a stream shared with other apps
  // may hold none of ours): nothing to wait for when there are none left.
  auto left = [&]() -> std::optional<uint64_t> {
    jsConsumerInfo* ci = nullptr;
    jsErrCode err = static_cast<jsErrCode>(0);
    if (natsSubscription_GetConsumerInfo(&ci, raw, nullptr, &err) != NATS_OK || ci == nullptr) return std::nullopt;
    const uint64_t n = ci->NumPending + static_cast<uint64_t>(ci->NumAckPending);
    const bool delivered_none = ci->Delivered.Consumer == 0;
    jsConsumerInfo_Destroy(ci);
    return delivered_none ? n : std::optional<uint64_t>{};
  };
  if (auto n = left(); n && *n == 0) return;

  uint64_t done = 0;
  int quiet = 0;
  while (true) {
    natsMsg* m = nullptr;
    s = natsSubscription_NextMsg(&m, raw, 2000);
    if (s == NATS_TIMEOUT) {
      // Nothing for 2 s: done if the stream holds nothing after what we saw (letters deleted
      // meanwhile), else keep waiting a bounded while.
      if (++quiet >= 5) throw TimeoutError("reading " + name_ + ": no message for 10 s", s);
      // Letters deleted while we read: done when the server has none of ours left to send.
      jsConsumerInfo* ci = nullptr;
      jsErrCode err = static_cast<jsErrCode>(0);
      if (natsSubscription_GetConsumerInfo(&ci, raw, nullptr, &err) == NATS_OK && ci != nullptr) {
        const bool none_left = ci->NumPending == 0;
        jsConsumerInfo_Destroy(ci);
        if (none_left) return;
      }
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
  if (!holds(subject)) return std::nullopt;  // not a DLQ subject
  return entry(seq, std::move(subject), body_of(raw), headers_of(raw));
}

void DeadLetterStream::remove(uint64_t seq) const {
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_DeleteMsg(nats_->jetstream(), name_.c_str(), seq, nullptr, &jerr);
  if (s != NATS_OK)
    throw NatsError("deleting " + name_ + " sequence " + std::to_string(seq) + ": " + status_text(s), s, jerr);
}

DeadLetter parse_natspubsub_js_letter(std::string_view subject, std::string_view body, const Headers& headers) {
  const std::string where = "NatsPubsub dead letter on " + std::string(subject);
  auto marker = headers.find(kDeadLetterHeader);
  if (marker == headers.end() || marker->second != "true") throw DlqFormatError(where + " has no x-dead-letter: true");
  auto j = nlohmann::json::parse(body, nullptr, false);
  if (j.is_discarded() || !j.is_object()) throw DlqFormatError(where + ": the body is not a JSON object");
  auto text = [&](const char* key) -> std::string {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return {};
    return it->is_string() ? it->get<std::string>() : it->dump();
  };
  DeadLetter l;
  l.original_subject = text("original_subject");
  if (l.original_subject.empty()) throw DlqFormatError(where + ": no original_subject");
  if (auto raw = text("raw_base64"); !raw.empty()) {
    l.body = base64_decode(raw);  // throws DlqFormatError
  } else if (auto p = j.find("payload"); p != j.end() && !p->is_null()) {
    l.body = p->is_string() ? p->get<std::string>() : p->dump();
  }
  if (auto h = j.find("headers"); h != j.end() && h->is_object()) {
    for (const auto& [key, value] : h->items()) {
      if (value.is_string()) {
        l.headers[key] = value.get<std::string>();
      } else if (value.is_array()) {  // nats.js headers: each key a list of values
        std::string joined;
        for (const auto& v : value) {
          if (!v.is_string()) continue;
          if (!joined.empty()) joined += ", ";
          joined += v.get<std::string>();
        }
        l.headers[key] = joined;
      }
    }
  }
  auto& c = l.context;
  c.event_id = text("event_id");
  if (auto it = headers.find("x-event-id"); c.event_id.empty() && it != headers.end()) c.event_id = it->second;
  std::string reason = text("reason");
  if (auto it = headers.find(kDlqReasonHeader); reason.empty() && it != headers.end()) reason = it->second;
  if (reason.empty()) reason = "unknown";
  c.reason = parse_dlq_reason(reason).value_or(DlqReason::other);
  c.reason_name = reason;
  c.error_message = text("error");
  if (auto colon = c.error_message.find(": "); colon != std::string::npos && colon < 80) {
    c.error_class = c.error_message.substr(0, colon);  // "Name: message", as NatsPubsub writes it
    c.error_message = c.error_message.substr(colon + 2);
  }
  if (auto d = j.find("deliveries"); d != j.end() && d->is_number_unsigned()) c.deliveries = d->get<uint64_t>();
  c.original_subject = l.original_subject;
  if (auto at = text("occurred_at"); !at.empty()) {
    try {
      c.published_at = parse_timestamp(at, "occurred_at");
    } catch (const std::exception&) {
      // Shown as unknown rather than hiding the letter.
    }
  }
  return l;
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
