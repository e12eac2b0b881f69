#include <natspubsub/dlq.hpp>

#include <array>
#include <cstdio>

#include <natspubsub/connection.hpp>
#include <natspubsub/log.hpp>

#include "nats_util.hpp"

namespace natspubsub {
namespace {

using nlohmann::json;

constexpr std::string_view kBase64Alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

// Headers the server acts on. Copied into a DLQ publish they would make it fail (an expected
// last sequence of the events stream) or do something else (a rollup), so they are not kept.
bool server_directive(const std::string& key) {
  return key.rfind("Nats-Expected-", 0) == 0 || key == "Nats-Rollup" || key == "Nats-Msg-Id";
}

bool is_dlq_header(const std::string& key) {
  return key == kDeadLetterHeader || key == kDlqReasonHeader || key == kDeliveriesHeader || key == kDlqContextHeader;
}

// Cuts at `limit` bytes without splitting a UTF-8 sequence.
std::string truncate_utf8(const std::string& text, size_t limit, bool& truncated) {
  truncated = text.size() > limit;
  if (!truncated) return text;
  size_t cut = limit;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  return text.substr(0, cut);
}

std::string dump_header_json(const json& j) {
  // ASCII only and no newlines: a header value must not contain CR/LF, and a non-UTF-8
  // exception text must not make the dead letter itself fail.
  return j.dump(-1, ' ', true, json::error_handler_t::replace);
}

const json& require(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) throw DlqFormatError(std::string("x-dlq-context: missing field ") + key);
  return *it;
}

std::string string_field(const json& j, const char* key, bool required = false) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) throw DlqFormatError(std::string("x-dlq-context: missing field ") + key);
    return {};
  }
  if (!it->is_string()) throw DlqFormatError(std::string("x-dlq-context: field ") + key + " must be a string");
  return it->get<std::string>();
}

uint64_t uint_field(const json& j, const char* key) {
  const auto& v = require(j, key);
  if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<int64_t>() >= 0))
    throw DlqFormatError(std::string("x-dlq-context: field ") + key + " must be a non-negative integer");
  return v.get<uint64_t>();
}

bool bool_field(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return false;
  if (!it->is_boolean()) throw DlqFormatError(std::string("x-dlq-context: field ") + key + " must be true or false");
  return it->get<bool>();
}

}  // namespace

const char* to_string(DlqReason reason) noexcept {
  switch (reason) {
    case DlqReason::malformed: return "malformed";
    case DlqReason::permanent_error: return "permanent_error";
    case DlqReason::attempts_exhausted: return "attempts_exhausted";
    case DlqReason::max_deliveries: return "max_deliveries";
    case DlqReason::other: return "other";
  }
  return "unknown";
}

std::optional<DlqReason> parse_dlq_reason(std::string_view name) noexcept {
  for (auto r : {DlqReason::malformed, DlqReason::permanent_error, DlqReason::attempts_exhausted,
                 DlqReason::max_deliveries}) {  // never `other`: it is not a name a writer uses
    if (name == to_string(r)) return r;
  }
  return std::nullopt;
}

std::string DlqContext::reason_text() const {
  if (reason == DlqReason::other && !reason_name.empty()) return reason_name;
  return to_string(reason);
}

json DlqContext::to_json() const {
  json j = {
      {"event_id", event_id},
      {"reason", reason_text()},
      {"error_class", error_class},
      {"error_message", error_message},
      {"deliveries", deliveries},
      {"original_subject", original_subject},
      {"stream", stream},
      {"sequence", sequence},
      {"consumer", consumer},
      {"published_at", format_timestamp(published_at)},
      {"raw_base64", raw_base64},
  };
  // Only when set, so the common record stays exactly the documented fields.
  if (replay_sequence != 0) j["replay_sequence"] = replay_sequence;
  if (raw_omitted) j["raw_omitted"] = true;
  if (body_omitted) j["body_omitted"] = true;
  if (error_message_truncated) j["error_message_truncated"] = true;
  return j;
}

DlqContext DlqContext::from_json(const json& j) {
  if (!j.is_object()) throw DlqFormatError("x-dlq-context must be a JSON object");
  DlqContext c;
  c.event_id = string_field(j, "event_id");
  const auto reason = string_field(j, "reason", true);
  // A reason this version does not know (written by a newer one, or by another producer of the
  // documented format) is kept as written: such a letter is listed, shown and replayed like any.
  if (reason.empty()) throw DlqFormatError("x-dlq-context: field reason is empty");
  c.reason = parse_dlq_reason(reason).value_or(DlqReason::other);
  c.reason_name = reason;
  c.error_class = string_field(j, "error_class");
  c.error_message = string_field(j, "error_message");
  c.deliveries = uint_field(j, "deliveries");
  c.original_subject = string_field(j, "original_subject", true);
  c.stream = string_field(j, "stream", true);
  c.sequence = uint_field(j, "sequence");
  c.consumer = string_field(j, "consumer");
  if (j.contains("replay_sequence")) c.replay_sequence = uint_field(j, "replay_sequence");
  const auto published = string_field(j, "published_at");
  if (!published.empty()) {
    try {
      c.published_at = parse_timestamp(published, "published_at");
    } catch (const EnvelopeError& e) {
      throw DlqFormatError(std::string("x-dlq-context: ") + e.what());
    }
  }
  c.raw_base64 = string_field(j, "raw_base64");
  c.raw_omitted = bool_field(j, "raw_omitted");
  c.body_omitted = bool_field(j, "body_omitted");
  c.error_message_truncated = bool_field(j, "error_message_truncated");
  return c;
}

std::string DeadLetter::msg_id() const {
  std::string id = "dlq-" + context.stream + "-" + std::to_string(context.sequence);
  if (!context.consumer.empty()) id += "-" + context.consumer;
  if (context.replay_sequence != 0) id += "-replay-" + std::to_string(context.replay_sequence);
  return id;
}

std::string replay_durable(std::string_view stream, std::string_view durable) {
  // FNV-1a over "stream\ndurable": stable across versions and platforms (the tool and the runtime
  // must agree), and neither name may contain a newline.
  uint32_t h = 2166136261u;
  auto mix = [&](std::string_view s) {
    for (unsigned char c : s) {
      h ^= c;
      h *= 16777619u;
    }
  };
  mix(stream);
  mix("\n");
  mix(durable);
  char hex[9];
  std::snprintf(hex, sizeof(hex), "%08x", h);
  return std::string(durable.substr(0, 200)) + "-" + hex + "-replay";
}

std::string replay_subject(const Config& config, std::string_view stream, std::string_view durable) {
  return "replay." + config.env + "." + config.app + "." + replay_durable(stream, durable);
}

std::string dlq_subject(const Config& config, std::string_view original_subject) {
  return "dlq." + config.env + "." + config.app + "." + std::string(original_subject);
}

size_t wire_size(const Headers& headers, size_t body_size) {
  // "NATS/1.0\r\n", one "key: value\r\n" per header, then "\r\n" (what cnats sends).
  size_t size = 10 + 2;
  for (const auto& [key, value] : headers) size += key.size() + 2 + value.size() + 2;
  return size + body_size;
}

RawMessage make_dlq_message(const DeadLetter& letter, const std::string& subject, size_t max_payload) {
  RawMessage out;
  out.subject = subject;
  out.msg_id = letter.msg_id();

  DlqContext ctx = letter.context;
  if (ctx.original_subject.empty()) ctx.original_subject = letter.original_subject;
  ctx.error_message = truncate_utf8(ctx.error_message, kMaxDlqErrorMessage, ctx.error_message_truncated);
  if (ctx.published_at == SystemTime{}) ctx.published_at = now_ms();

  Headers original;
  for (const auto& [key, value] : letter.headers) {
    if (server_directive(key) || is_dlq_header(key)) continue;
    original[key] = value;
  }
  // The failed message's own id, not one it carried from an earlier life: read_original checks
  // the message at context.stream/sequence against it.
  if (auto id = letter.headers.find("Nats-Msg-Id"); id != letter.headers.end())
    original[kOriginalMsgIdHeader] = id->second;

  // Each step gives up something to fit max_payload; the original stays in its stream
  // (stream + sequence are always in the context), so nothing is lost for good.
  for (int level = 0; level < 4; ++level) {
    ctx.raw_omitted = level >= 1;
    ctx.body_omitted = level >= 2;
    ctx.raw_base64 = ctx.raw_omitted ? std::string() : base64_encode(letter.body);
    out.payload = ctx.body_omitted ? std::string() : letter.body;
    out.headers = level >= 3 ? Headers{} : original;
    out.headers[kDeadLetterHeader] = "true";
    out.headers[kDlqReasonHeader] = ctx.reason_text();
    out.headers[kDeliveriesHeader] = std::to_string(ctx.deliveries);
    out.headers[kDlqContextHeader] = dump_header_json(ctx.to_json());
    Headers with_id = out.headers;
    with_id["Nats-Msg-Id"] = out.msg_id;
    if (wire_size(with_id, out.payload.size()) <= max_payload) break;
  }
  return out;
}

DeadLetter parse_dead_letter(std::string_view subject, std::string_view body, const Headers& headers) {
  auto get = [&](const char* key) -> const std::string* {
    auto it = headers.find(key);
    return it == headers.end() ? nullptr : &it->second;
  };
  const auto* marker = get(kDeadLetterHeader);
  if (marker == nullptr || *marker != "true")
    throw DlqFormatError("message on " + std::string(subject) + " is not a dead letter (no x-dead-letter: true)");
  const auto* context_text = get(kDlqContextHeader);
  if (context_text == nullptr) throw DlqFormatError("dead letter on " + std::string(subject) + " has no x-dlq-context");
  json j = json::parse(*context_text, nullptr, false);
  if (j.is_discarded()) throw DlqFormatError("dead letter on " + std::string(subject) + ": x-dlq-context is not JSON");

  DeadLetter letter;
  letter.context = DlqContext::from_json(j);
  letter.original_subject = letter.context.original_subject;
  letter.body = std::string(body);
  if (letter.context.body_omitted && !letter.context.raw_base64.empty())
    letter.body = base64_decode(letter.context.raw_base64);
  for (const auto& [key, value] : headers) {
    if (is_dlq_header(key) || key == "Nats-Msg-Id") continue;
    if (key == kOriginalMsgIdHeader) {
      letter.headers["Nats-Msg-Id"] = value;
      continue;
    }
    letter.headers[key] = value;
  }
  return letter;
}

std::string base64_encode(std::string_view bytes) {
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < bytes.size(); i += 3) {
    const uint32_t n = (static_cast<uint8_t>(bytes[i]) << 16) | (static_cast<uint8_t>(bytes[i + 1]) << 8) |
                       static_cast<uint8_t>(bytes[i + 2]);
    out += kBase64Alphabet[(n >> 18) & 63];
    out += kBase64Alphabet[(n >> 12) & 63];
    out += kBase64Alphabet[(n >> 6) & 63];
    out += kBase64Alphabet[n & 63];
  }
  const size_t rest = bytes.size() - i;
  if (rest > 0) {
    uint32_t n = static_cast<uint8_t>(bytes[i]) << 16;
    if (rest == 2) n |= static_cast<uint8_t>(bytes[i + 1]) << 8;
    out += kBase64Alphabet[(n >> 18) & 63];
    out += kBase64Alphabet[(n >> 12) & 63];
    out += rest == 2 ? kBase64Alphabet[(n >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

std::string base64_decode(std::string_view text) {
  if (text.size() % 4 != 0) throw DlqFormatError("base64: length is not a multiple of 4");
  std::array<int, 256> value{};
  value.fill(-1);
  for (size_t i = 0; i < kBase64Alphabet.size(); ++i) value[static_cast<uint8_t>(kBase64Alphabet[i])] = static_cast<int>(i);
  std::string out;
  out.reserve(text.size() / 4 * 3);
  for (size_t i = 0; i < text.size(); i += 4) {
    const bool last = i + 4 == text.size();
    int v[4];
    int pad = 0;
    for (int k = 0; k < 4; ++k) {
      const char c = text[i + static_cast<size_t>(k)];
      if (c == '=' && last && k >= 2) {
        v[k] = 0;
        ++pad;
        continue;
      }
      if (pad > 0) throw DlqFormatError("base64: data after padding");
      v[k] = value[static_cast<uint8_t>(c)];
      if (v[k] < 0) throw DlqFormatError("base64: invalid character");
    }
    const uint32_t n = (static_cast<uint32_t>(v[0]) << 18) | (static_cast<uint32_t>(v[1]) << 12) |
                       (static_cast<uint32_t>(v[2]) << 6) | static_cast<uint32_t>(v[3]);
    out += static_cast<char>((n >> 16) & 0xFF);
    if (pad < 2) out += static_cast<char>((n >> 8) & 0xFF);
    if (pad < 1) out += static_cast<char>(n & 0xFF);
  }
  return out;
}

DlqPublisher::DlqPublisher(Connection& connection, std::string subject_prefix)
    : connection_(&connection), prefix_(std::move(subject_prefix)) {
  if (prefix_.empty()) prefix_ = "dlq." + connection.config().env + "." + connection.config().app;
}

std::string DlqPublisher::subject_for(std::string_view original_subject) const {
  return prefix_ + "." + std::string(original_subject);
}

PublishResult DlqPublisher::publish(const DeadLetter& letter) const {
  natsConnection* nc = connection_->native();
  const int64_t max_payload = nc != nullptr ? natsConnection_GetMaxPayload(nc) : 0;
  // Before the first INFO (or when closed) cnats reports 0: assume the server default.
  const size_t limit = max_payload > 0 ? static_cast<size_t>(max_payload) : size_t{1024 * 1024};
  const auto raw = make_dlq_message(letter, subject_for(letter.original_subject), limit);
  if (raw.payload.size() != letter.body.size())
    logger()->warn("dead letter {}: body left out to fit max_payload {}; the original stays in {} at {}", raw.msg_id,
                   limit, letter.context.stream, letter.context.sequence);

  natsMsg* raw_msg = nullptr;
  detail::check(natsMsg_Create(&raw_msg, raw.subject.c_str(), nullptr, raw.payload.data(),
                               static_cast<int>(raw.payload.size())),
                "creating dead letter for " + raw.subject);
  detail::MsgPtr msg(raw_msg);
  for (const auto& [key, value] : raw.headers)
    detail::check(natsMsgHeader_Set(msg.get(), key.c_str(), value.c_str()), "setting header " + key);
  detail::check(natsMsgHeader_Set(msg.get(), "Nats-Msg-Id", raw.msg_id.c_str()), "setting Nats-Msg-Id");

  jsPubOptions po;
  jsPubOptions_Init(&po);
  po.MaxWait = connection_->config().connection.jetstream_timeout.count();
  jsPubAck* raw_ack = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_PublishMsg(&raw_ack, connection_->jetstream(), msg.get(), &po, &jerr);
  detail::PubAckPtr ack(raw_ack);
  if (s != NATS_OK) {
    std::string what = "publishing dead letter " + raw.msg_id + " to " + raw.subject + ": ";
    what += s == NATS_NO_RESPONDERS ? "no DLQ stream captures the subject" : detail::last_error_text(s);
    if (jerr != 0) what += " (jsErrCode " + std::to_string(static_cast<int>(jerr)) + ")";
    if (s == NATS_TIMEOUT) throw TimeoutError(what, s, jerr);
    if (s == NATS_CONNECTION_CLOSED || s == NATS_CONNECTION_DISCONNECTED) throw ConnectionError(what, s, jerr);
    throw PublishError(what, s, jerr);
  }
  PublishResult result;
  result.event_id = letter.context.event_id;
  result.subject = raw.subject;
  result.stream = ack->Stream != nullptr ? ack->Stream : "";
  result.sequence = ack->Sequence;
  result.duplicate = ack->Duplicate;
  return result;
}

}  // namespace natspubsub
