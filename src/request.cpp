#include <natspubsub/request.hpp>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#include <natspubsub/connection.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/log.hpp>
#include <natspubsub/middleware.hpp>
#include <natspubsub/subject.hpp>

#include "nats_util.hpp"
#include "printable.hpp"

namespace natspubsub {
namespace {

using detail::body_of;
using detail::read_headers;

constexpr const char* kServiceErrorHeader = "Nats-Service-Error";
constexpr const char* kServiceErrorCodeHeader = "Nats-Service-Error-Code";
// Error texts are cut to this many bytes: they travel in a header and end up in logs.
constexpr std::size_t kMaxErrorText = 1024;

thread_local std::optional<std::string> tls_correlation_id;

using Clock = std::chrono::steady_clock;

std::string find_header(const Headers& headers, std::string_view name) {
  if (auto it = headers.find(std::string(name)); it != headers.end()) return it->second;
  auto lower = [](char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; };
  for (const auto& [key, value] : headers) {
    if (key.size() != name.size()) continue;
    bool same = true;
    for (size_t i = 0; i < key.size() && same; ++i) same = lower(key[i]) == lower(name[i]);
    if (same) return value;
  }
  return {};
}

detail::MsgPtr make_msg(const std::string& subject, const std::string& reply, const std::string& body,
                        const Headers& headers) {
  natsMsg* raw = nullptr;
  detail::check(natsMsg_Create(&raw, subject.c_str(), reply.empty() ? nullptr : reply.c_str(), body.data(),
                               static_cast<int>(body.size())),
                "creating message for " + subject);
  detail::MsgPtr msg(raw);
  for (const auto& [key, value] : headers)
    detail::check(natsMsgHeader_Set(msg.get(), key.c_str(), value.c_str()), "setting header " + key);
  return msg;
}

// A reply body. Error texts may hold any bytes a handler put in what(): replaced, never thrown on.
std::string reply_body(bool success, const nlohmann::json& payload, const std::string& message_id) {
  nlohmann::json j = {{"success", success}};
  j[success ? "data" : "error"] = payload;
  j["messageId"] = message_id;
  j["timestamp"] = format_timestamp(now_ms());
  // Strict for data (a handler returning invalid UTF-8 gets an error reply instead), lenient for errors.
  return success ? j.dump() : j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

int parse_code(const std::string& text) {
  try {
    size_t used = 0;
    int code = std::stoi(text, &used);
    return used == text.size() ? code : RemoteError::kHandlerFailed;
  } catch (...) {
    return RemoteError::kHandlerFailed;
  }
}

// Turns one answer into a Reply, or throws RemoteError / EnvelopeError.
Reply decode_reply(natsMsg* msg, const std::string& subject, const std::string& message_id) {
  Reply reply;
  reply.subject = subject;
  reply.headers = read_headers(msg);
  reply.correlation_id = find_header(reply.headers, kCorrelationIdHeader);
  const std::string body = body_of(msg);
  auto j = nlohmann::json::parse(body, nullptr, false);

  const std::string code_text = find_header(reply.headers, kServiceErrorCodeHeader);
  if (!code_text.empty()) {
    // The NATS service API way: any service (ours or not) marks errors with these headers.
    std::string text = find_header(reply.headers, kServiceErrorHeader);
    if (j.is_object() && j.contains("error") && j["error"].is_string()) text = j["error"].get<std::string>();
    throw RemoteError(parse_code(code_text), text, subject, message_id);
  }
  if (j.is_discarded())
    throw EnvelopeError(EnvelopeError::Kind::malformed_json, "",
                        "reply from " + subject + " is not JSON: " + detail::quoted(body));
  if (!j.is_object())
    throw EnvelopeError(EnvelopeError::Kind::not_an_object, "",
                        "reply from " + subject + " is not a JSON object: " + detail::quoted(body));
  if (!j.contains("success"))
    throw EnvelopeError(EnvelopeError::Kind::missing_field, "success",
                        "reply from " + subject + " has no \"success\" field: " + detail::quoted(body));
  if (!j["success"].is_boolean())
    throw EnvelopeError(EnvelopeError::Kind::wrong_type, "success",
                        "reply from " + subject + ": \"success\" is not a boolean");
  if (!j["success"].get<bool>()) {
    std::string text = j.contains("error") && j["error"].is_string() ? j["error"].get<std::string>() : j.value("error", nlohmann::json()).dump();
    throw RemoteError(RemoteError::kHandlerFailed, text, subject, message_id);
  }
  reply.data = j.contains("data") ? j["data"] : nlohmann::json();
  reply.message_id = j.contains("messageId") && j["messageId"].is_string() ? j["messageId"].get<std::string>() : "";
  if (j.contains("timestamp") && j["timestamp"].is_string())
    reply.timestamp = parse_timestamp(j["timestamp"].get<std::string>(), "timestamp");
  return reply;
}

}  // namespace

// ---- correlation ------------------------------------------------------------------------------

CorrelationScope::CorrelationScope(std::string id) : previous_(std::move(tls_correlation_id)) {
  tls_correlation_id = std::move(id);
}

CorrelationScope::~CorrelationScope() { tls_correlation_id = std::move(previous_); }

std::optional<std::string> current_correlation_id() { return tls_correlation_id; }

std::string Request::header(std::string_view name) const { return find_header(headers, name); }

// ---- request ----------------------------------------------------------------------------------

Reply request(Connection& connection, std::string_view topic, const nlohmann::json& message,
              const RequestOptions& options) {
  if (options.timeout.count() <= 0) throw ConfigError("request.timeout", "must be greater than 0 ms");
  if (options.retries < 0) throw ConfigError("request.retries", "must be >= 0");
  if (options.retries > 0 && !options.idempotent)
    throw ConfigError("request.retries", "only an idempotent request may be retried: set idempotent = true");
  const auto& config = connection.config();
  std::string subject;
  if (options.subject) {
    subject::validate_subject(*options.subject);
    subject = *options.subject;
  } else {
    subject = subject::build(config.env, options.app.value_or(config.app), topic);
  }

  Envelope e = Envelope::make(std::string(topic), config.app, message);
  if (options.message_id) e.event_id = *options.message_id;
  e.message_type = options.message_type;
  const std::string body = e.encode();

  Headers headers = options.headers;
  // Correlation: explicit, else the request or message being handled on this thread, else the
  // current trace (middleware::trace_context), else this request starts a conversation.
  const auto trace = current_trace();
  std::string correlation = options.correlation_id.value_or(
      current_correlation_id().value_or(trace ? trace->trace_id : e.event_id));
  headers[kCorrelationIdHeader] = correlation;
  headers["topic"] = std::string(topic);
  if (options.traceparent) headers["traceparent"] = *options.traceparent;
  else if (trace) headers["traceparent"] = trace->traceparent();

  const int attempts = 1 + options.retries;
  for (int attempt = 1;; ++attempt) {
    auto msg = make_msg(subject, "", body, headers);
    natsMsg* raw_reply = nullptr;
    const auto started = Clock::now();
    const natsStatus status = natsConnection_RequestMsg(&raw_reply, connection.native(), msg.get(),
                                                        options.timeout.count());
    detail::MsgPtr answer(raw_reply);
    const bool last = attempt >= attempts;
    std::optional<RemoteError> unavailable;
    if (status == NATS_OK) {
      try {
        Reply reply = decode_reply(answer.get(), subject, e.event_id);
        reply.attempts = attempt;
        if (reply.correlation_id.empty()) reply.correlation_id = correlation;
        return reply;
      } catch (const RemoteError& re) {
        if (!re.unavailable() || last) throw;
        unavailable = re;
      }
    } else if (status == NATS_TIMEOUT) {
      if (last)
        throw TimeoutError("request " + e.event_id + " to " + subject + ": no reply within " +
                               std::to_string(options.timeout.count()) + " ms" +
                               (attempts > 1 ? " (attempt " + std::to_string(attempt) + " of " + std::to_string(attempts) + ")" : ""),
                           status);
    } else if (status == NATS_NO_RESPONDERS) {
      if (last) throw NoRespondersError("request " + e.event_id + " to " + subject + ": no responders", status);
    } else {
      detail::throw_status(status, "request " + e.event_id + " to " + subject);
    }
    logger()->debug("request {} to {}: attempt {}/{} failed ({}) after {} ms; retrying in {} ms", e.event_id, subject,
                    attempt, attempts, unavailable ? unavailable->what() : natsStatus_GetText(status),
                    std::chrono::duration_cast<Millis>(Clock::now() - started).count(), options.retry_delay.count());
    std::this_thread::sleep_for(options.retry_delay);
  }
}

// ---- responder --------------------------------------------------------------------------------

nlohmann::json ResponderStats::to_json() const {
  nlohmann::json j = {{"name", name},
                      {"subject", subject},
                      {"queue_group", queue_group},
                      {"requests", requests},
                      {"errors", errors},
                      {"rejected", rejected},
                      {"malformed", malformed},
                      {"unanswerable", unanswerable},
                      {"last_error", last_error},
                      {"processing_time_ns", processing_time.count()}};
  if (circuit) j["circuit"] = circuit->to_json();
  return j;
}

namespace {

// Everything the message callbacks touch. Shared with cnats: a subscription's callback may still
// run after the Responder is gone (a drain that timed out), so each subscription keeps it alive
// until cnats reports the subscription complete.
struct ResponderState {
  std::string name;
  std::string subject;
  std::string queue_group;
  std::string topic;
  std::map<std::string, std::string> metadata;
  RequestHandler handler;
  std::shared_ptr<CircuitBreaker> breaker;

  std::atomic<uint64_t> requests{0}, errors{0}, rejected{0}, malformed{0}, unanswerable{0};
  std::atomic<int64_t> processing_ns{0};
  mutable std::mutex mutex;
  std::string last_error;

  void note_error(const std::string& text) {
    errors++;
    std::lock_guard lock(mutex);
    last_error = text;
  }

  ResponderStats stats() const {
    ResponderStats s;
    s.name = name;
    s.subject = subject;
    s.queue_group = queue_group;
    s.requests = requests.load();
    s.errors = errors.load();
    s.rejected = rejected.load();
    s.malformed = malformed.load();
    s.unanswerable = unanswerable.load();
    s.processing_time = std::chrono::nanoseconds{processing_ns.load()};
    {
      std::lock_guard lock(mutex);
      s.last_error = last_error;
    }
    if (breaker) s.circuit = breaker->stats();
    return s;
  }

  void send(natsConnection* nc, const char* reply_to, const std::string& body, Headers headers) {
    try {
      auto msg = make_msg(reply_to, "", body, headers);
      natsStatus status = natsConnection_PublishMsg(nc, msg.get());
      if (status != NATS_OK)
        logger()->warn("responder {}: reply not sent: {}", subject, detail::last_error_text(status));
    } catch (const std::exception& e) {
      logger()->warn("responder {}: reply not sent: {}", subject, e.what());
    }
  }

  void send_error(natsConnection* nc, const char* reply_to, int code, const std::string& text,
                  const std::string& message_id, const std::string& correlation) {
    const std::string shown = detail::printable(text, kMaxErrorText);
    Headers headers{{kServiceErrorHeader, shown}, {kServiceErrorCodeHeader, std::to_string(code)}};
    if (!correlation.empty()) headers[kCorrelationIdHeader] = correlation;
    std::string cut = text.size() > kMaxErrorText ? text.substr(0, kMaxErrorText) + "..." : text;
    send(nc, reply_to, reply_body(false, cut, message_id), std::move(headers));
  }

  void handle(natsConnection* nc, natsMsg* msg) {
    const auto started = Clock::now();
    requests++;
    const char* reply_to = natsMsg_GetReply(msg);
    if (reply_to == nullptr || *reply_to == '\0') {
      // A plain publish on a request subject: nobody waits, so there is nobody to answer.
      unanswerable++;
      logger()->warn("responder {}: message without a reply subject ignored", subject);
      return;
    }
    Request request;
    request.subject = natsMsg_GetSubject(msg);
    request.headers = read_headers(msg);
    const std::string body = body_of(msg);
    try {
      request.envelope = Envelope::decode(body);
    } catch (const EnvelopeError& e) {
      malformed++;
      note_error(e.what());
      send_error(nc, reply_to, RemoteError::kBadRequest, std::string("request is not an envelope: ") + e.what(), "",
                 request.header(kCorrelationIdHeader));
      logger()->warn("responder {}: unreadable request answered 400: {}", subject, e.what());
      processing_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - started).count();
      return;
    }
    request.correlation_id = request.header(kCorrelationIdHeader);
    if (request.correlation_id.empty()) request.correlation_id = request.envelope.event_id;
    const std::string& id = request.envelope.event_id;

    if (breaker && !breaker->allow()) {
      rejected++;
      const std::string text = "unavailable: circuit " + breaker->options().name + " is open";
      note_error(text);
      send_error(nc, reply_to, RemoteError::kUnavailable, text, id, request.correlation_id);
      processing_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - started).count();
      return;
    }

    int code = 0;
    std::string error;
    std::string reply;
    {
      CorrelationScope scope(request.correlation_id);
      // The caller's trace continues in the handler (a child span), and in what it sends.
      std::optional<TraceScope> trace;
      if (auto parent = TraceContext::parse(request.header("traceparent")))
        trace.emplace(TraceContext::child_of(*parent));
      try {
        nlohmann::json data = handler(request);
        reply = reply_body(true, data, id);
      } catch (const RemoteError& e) {
        code = e.code();
        error = e.remote_message();
      } catch (const std::exception& e) {
        code = RemoteError::kHandlerFailed;
        error = e.what();
      } catch (...) {
        code = RemoteError::kHandlerFailed;
        error = "non-standard exception";
      }
    }
    if (breaker) {
      // A 4xx is the caller's mistake, not a sign that a dependency is down.
      if (code == 0 || (code >= 400 && code < 500)) breaker->record_success();
      else breaker->record_failure(error);
    }
    if (code == 0) {
      send(nc, reply_to, reply, Headers{{kCorrelationIdHeader, request.correlation_id}});
    } else {
      note_error(error);
      send_error(nc, reply_to, code, error, id, request.correlation_id);
      // A 4xx is an ordinary answer to a bad question; a 5xx is a failure someone should look at.
      logger()->log(code >= 400 && code < 500 ? spdlog::level::info : spdlog::level::warn,
                    "responder {}: request {} answered {}: {}", subject, id, code, detail::printable(error, 200));
    }
    processing_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - started).count();
  }
};

struct Holder {
  std::shared_ptr<ResponderState> state;
};

void on_request(natsConnection* nc, natsSubscription*, natsMsg* raw, void* closure) {
  detail::MsgPtr msg(raw);  // the callback owns the message (nats.h, natsMsgHandler)
  auto& state = *static_cast<Holder*>(closure)->state;
  try {
    state.handle(nc, msg.get());
  } catch (const std::exception& e) {
    // handle() answers every failure of the handler; this is the last line against a bug of ours.
    logger()->error("responder {}: request not handled: {}", state.subject, e.what());
  } catch (...) {
    logger()->error("responder {}: request not handled (non-standard exception)", state.subject);
  }
}

void on_complete(void* closure) { delete static_cast<Holder*>(closure); }

}  // namespace

struct Responder::Impl {
  std::shared_ptr<ResponderState> state = std::make_shared<ResponderState>();
  std::vector<detail::SubscriptionPtr> subs;
  std::mutex stop_mutex;
};

Responder::Responder(Connection& connection, std::string_view topic, RequestHandler handler, ResponderOptions options)
    : impl_(std::make_unique<Impl>()) {
  if (!handler) throw ConfigError("responder.handler", "must be callable");
  if (options.concurrency < 1) throw ConfigError("responder.concurrency", "must be >= 1");
  const auto& config = connection.config();
  auto& st = *impl_->state;
  if (options.subject) {
    subject::validate_subject(*options.subject);
    st.subject = *options.subject;
  } else {
    st.subject = config.subject(topic);
  }
  st.topic = std::string(topic);
  st.queue_group = options.queue_group.value_or(config.env + "-" + config.app);
  if (st.queue_group.empty()) throw ConfigError("responder.queue_group", "must not be empty");
  subject::validate_token(st.queue_group, "queue group");
  st.name = options.name.empty() ? st.topic : options.name;
  st.metadata = std::move(options.metadata);
  st.handler = std::move(handler);
  st.breaker = std::move(options.circuit_breaker);

  for (int i = 0; i < options.concurrency; ++i) {
    auto* holder = new Holder{impl_->state};
    natsSubscription* raw = nullptr;
    natsStatus status = natsConnection_QueueSubscribe(&raw, connection.native(), st.subject.c_str(),
                                                      st.queue_group.c_str(), on_request, holder);
    if (status != NATS_OK) {
      delete holder;  // no subscription, so no completion callback will free it
      impl_->subs.clear();
      detail::throw_status(status, "subscribing responder to " + st.subject);
    }
    detail::SubscriptionPtr sub(raw);
    if (natsSubscription_SetOnCompleteCB(sub.get(), on_complete, holder) != NATS_OK) {
      // Cannot happen on a fresh subscription; keeping the holder is safer than freeing it.
      logger()->warn("responder {}: completion callback not set; a few bytes stay allocated", st.subject);
    }
    impl_->subs.push_back(std::move(sub));
  }
  // The interest must reach the server before we say we are answering, or a request sent right
  // after construction finds no responders.
  natsStatus flushed = natsConnection_FlushTimeout(connection.native(), config.connection.jetstream_timeout.count());
  if (flushed != NATS_OK) logger()->warn("responder {}: subscription not confirmed yet: {}", st.subject,
                                         detail::last_error_text(flushed));
  logger()->info("responder on {} (queue group {}, concurrency {}{})", st.subject, st.queue_group,
                 options.concurrency, st.breaker ? ", circuit " + st.breaker->options().name : std::string());
}

Responder::~Responder() {
  if (impl_) stop();
}

void Responder::stop(Millis timeout) {
  std::lock_guard lock(impl_->stop_mutex);
  if (impl_->subs.empty()) return;
  // Drain: the server stops sending us requests, and what was received is still answered.
  for (auto& sub : impl_->subs) natsSubscription_DrainTimeout(sub.get(), timeout.count());
  const auto deadline = Clock::now() + timeout;
  bool complete = true;
  for (auto& sub : impl_->subs) {
    const auto left = std::max<int64_t>(1, std::chrono::duration_cast<Millis>(deadline - Clock::now()).count());
    const natsStatus status = natsSubscription_WaitForDrainCompletion(sub.get(), left);
    // NATS_ILLEGAL_STATE: the subscription was closed already (connection closed): nothing to wait for.
    if (status != NATS_OK && status != NATS_ILLEGAL_STATE) complete = false;
  }
  if (!complete)
    logger()->warn("responder {}: stop deadline of {} ms passed; requests not answered yet are dropped",
                   impl_->state->subject, timeout.count());
  else
    logger()->info("responder {} stopped after {} request(s)", impl_->state->subject,
                   impl_->state->requests.load());
  impl_->subs.clear();
}

ResponderStats Responder::stats() const { return impl_->state->stats(); }

std::function<ResponderStats()> Responder::stats_source() const {
  return [state = impl_->state] { return state->stats(); };
}

const std::string& Responder::subject() const noexcept { return impl_->state->subject; }
const std::string& Responder::queue_group() const noexcept { return impl_->state->queue_group; }
const std::string& Responder::name() const noexcept { return impl_->state->name; }
const std::map<std::string, std::string>& Responder::metadata() const noexcept { return impl_->state->metadata; }

}  // namespace natspubsub
