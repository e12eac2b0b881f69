#include <natspubsub/service.hpp>

#include <algorithm>
#include <mutex>
#include <random>
#include <regex>

#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/log.hpp>
#include <natspubsub/request.hpp>
#include <natspubsub/subject.hpp>

#include "nats_util.hpp"

namespace natspubsub {
namespace {

using Clock = std::chrono::steady_clock;

constexpr const char* kPingType = "io.nats.micro.v1.ping_response";
constexpr const char* kInfoType = "io.nats.micro.v1.info_response";
constexpr const char* kStatsType = "io.nats.micro.v1.stats_response";
constexpr std::size_t kIdLength = 22;

// The SemVer 2.0 grammar (semver.org), as ADR-32 asks services to check.
bool is_semver(const std::string& version) {
  static const std::regex pattern(
      R"(^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*))"
      R"((?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?)"
      R"((?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$)");
  return std::regex_match(version, pattern);
}

std::string random_id() {
  static constexpr char kAlphabet[] = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
  thread_local std::mt19937_64 generator{std::random_device{}()};
  std::uniform_int_distribution<std::size_t> pick(0, sizeof(kAlphabet) - 2);
  std::string id(kIdLength, '0');
  for (auto& c : id) c = kAlphabet[pick(generator)];
  return id;
}

nlohmann::json metadata_json(const std::map<std::string, std::string>& metadata) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [k, v] : metadata) j[k] = v;
  return j;
}

ServiceEndpoint endpoint_of(const ResponderStats& s, const std::map<std::string, std::string>& metadata) {
  ServiceEndpoint e;
  e.name = s.name;
  e.subject = s.subject;
  e.queue_group = s.queue_group;
  e.metadata = metadata;
  e.num_requests = s.requests;
  e.num_errors = s.errors;
  e.last_error = s.last_error;
  e.processing_time = s.processing_time;
  e.data = s.to_json();
  return e;
}

ServiceEndpoint endpoint_of(const SubscriptionStats& s) {
  ServiceEndpoint e;
  e.name = s.durable;
  e.subject = s.subject;
  e.queue_group = s.durable;
  e.metadata = {{"kind", "jetstream-consumer"}, {"durable", s.durable}};
  e.num_requests = s.received;
  e.num_errors = s.handler_errors;
  if (s.circuit) e.last_error = s.circuit->last_error;
  e.processing_time = std::chrono::duration_cast<std::chrono::nanoseconds>(s.latency.sum);
  e.data = subscription_json(s);
  return e;
}

}  // namespace

nlohmann::json subscription_json(const SubscriptionStats& s) {
  nlohmann::json j = {{"subject", s.subject},
                      {"durable", s.durable},
                      {"stream", s.stream},
                      {"received", s.received},
                      {"acked", s.acked},
                      {"retried", s.retried},
                      {"dead_lettered", s.dead_lettered},
                      {"discarded", s.discarded},
                      {"malformed", s.malformed},
                      {"max_deliveries", s.max_deliveries},
                      {"handler_errors", s.handler_errors},
                      {"nacked_on_stop", s.nacked_on_stop},
                      {"ack_failures", s.ack_failures},
                      {"dlq_failures", s.dlq_failures},
                      {"deferred", s.deferred},
                      {"in_flight", s.in_flight},
                      {"running", s.running},
                      {"latency_us",
                       {{"count", s.latency.count},
                        {"mean", s.latency.mean().count()},
                        {"p50", s.latency.quantile(0.5).count()},
                        {"p99", s.latency.quantile(0.99).count()},
                        {"max", s.latency.max.count()}}}};
  if (s.circuit) j["circuit"] = s.circuit->to_json();
  if (s.rate_limit) j["rate_limit"] = s.rate_limit->to_json();
  return j;
}

void ServiceOptions::validate() const {
  if (name.empty()) throw ConfigError("service.name", "must not be empty");
  if (!subject::is_valid_token(name)) throw ConfigError("service.name", "may hold only A-Z, a-z, 0-9, '-' and '_'");
  if (!is_semver(version)) throw ConfigError("service.version", "must be a semantic version such as 1.0.0");
  if (!id.empty() && !subject::is_valid_token(id))
    throw ConfigError("service.id", "may hold only A-Z, a-z, 0-9, '-' and '_'");
}

// Everything the discovery callbacks touch; kept alive by each subscription until cnats reports
// it complete (see Responder for the same pattern).
struct ServiceState {
  ServiceOptions options;
  SystemTime started{};
  mutable std::mutex mutex;
  std::vector<EndpointSource> sources;

  std::vector<ServiceEndpoint> endpoints() const {
    std::vector<EndpointSource> copy;
    {
      std::lock_guard lock(mutex);
      copy = sources;
    }
    std::vector<ServiceEndpoint> out;
    for (const auto& source : copy) {
      try {
        auto part = source();
        out.insert(out.end(), std::make_move_iterator(part.begin()), std::make_move_iterator(part.end()));
      } catch (const std::exception& e) {
        logger()->warn("service {}: an endpoint source failed: {}", options.name, e.what());
      } catch (...) {
        logger()->warn("service {}: an endpoint source failed (non-standard exception)", options.name);
      }
    }
    return out;
  }

  nlohmann::json identity(const char* type) const {
    return {{"type", type},
            {"name", options.name},
            {"id", options.id},
            {"version", options.version},
            {"metadata", metadata_json(options.metadata)}};
  }

  nlohmann::json ping() const { return identity(kPingType); }

  nlohmann::json info() const {
    auto j = identity(kInfoType);
    j["description"] = options.description;
    j["endpoints"] = nlohmann::json::array();
    for (const auto& e : endpoints()) {
      j["endpoints"].push_back({{"name", e.name},
                                {"subject", e.subject},
                                {"queue_group", e.queue_group},
                                {"metadata", metadata_json(e.metadata)}});
    }
    return j;
  }

  nlohmann::json stats() const {
    auto j = identity(kStatsType);
    j["endpoints"] = nlohmann::json::array();
    for (const auto& e : endpoints()) {
      const int64_t total = e.processing_time.count();
      nlohmann::json ej = {{"name", e.name},
                           {"subject", e.subject},
                           {"queue_group", e.queue_group},
                           {"num_requests", e.num_requests},
                           {"num_errors", e.num_errors},
                           {"last_error", e.last_error},
                           {"processing_time", total},
                           {"average_processing_time",
                            e.num_requests == 0 ? 0 : total / static_cast<int64_t>(e.num_requests)}};
      if (!e.data.is_null()) ej["data"] = e.data;
      j["endpoints"].push_back(std::move(ej));
    }
    j["started"] = format_timestamp(started);
    return j;
  }
};

namespace {

struct ServiceHolder {
  std::shared_ptr<ServiceState> state;
};

void on_discovery(natsConnection* nc, natsSubscription*, natsMsg* raw, void* closure) {
  detail::MsgPtr msg(raw);  // ours (nats.h, natsMsgHandler)
  const auto& state = *static_cast<ServiceHolder*>(closure)->state;
  const char* reply = natsMsg_GetReply(msg.get());
  if (reply == nullptr || *reply == '\0') return;
  // "$SRV.<VERB>[.<name>[.<id>]]": the subscriptions take any verb; we answer the three we know.
  const auto tokens = subject::tokens(natsMsg_GetSubject(msg.get()));
  if (tokens.size() < 2) return;
  try {
    nlohmann::json body;
    if (tokens[1] == "PING") body = state.ping();
    else if (tokens[1] == "INFO") body = state.info();
    else if (tokens[1] == "STATS") body = state.stats();
    else return;
    const std::string text = body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    const natsStatus status = natsConnection_Publish(nc, reply, text.data(), static_cast<int>(text.size()));
    if (status != NATS_OK)
      logger()->warn("service {}: discovery reply not sent: {}", state.options.name, detail::last_error_text(status));
  } catch (const std::exception& e) {
    logger()->error("service {}: discovery request not answered: {}", state.options.name, e.what());
  }
}

void on_discovery_complete(void* closure) { delete static_cast<ServiceHolder*>(closure); }

}  // namespace

struct Service::Impl {
  std::shared_ptr<ServiceState> state = std::make_shared<ServiceState>();
  std::vector<detail::SubscriptionPtr> subs;
  std::mutex stop_mutex;
};

Service::Service(Connection& connection, ServiceOptions options) : impl_(std::make_unique<Impl>()) {
  options.validate();
  if (options.id.empty()) options.id = random_id();
  auto& st = *impl_->state;
  st.options = std::move(options);
  st.started = now_ms();
  const auto& name = st.options.name;
  // Three wildcard subscriptions instead of nine: cnats gives each async subscription a thread.
  const std::vector<std::string> subjects{"$SRV.*", "$SRV.*." + name, "$SRV.*." + name + "." + st.options.id};
  for (const auto& subject : subjects) {
    auto* holder = new ServiceHolder{impl_->state};
    natsSubscription* raw = nullptr;
    const natsStatus status = natsConnection_Subscribe(&raw, connection.native(), subject.c_str(), on_discovery, holder);
    if (status != NATS_OK) {
      delete holder;
      impl_->subs.clear();
      detail::throw_status(status, "subscribing service " + name + " to " + subject);
    }
    detail::SubscriptionPtr sub(raw);
    if (natsSubscription_SetOnCompleteCB(sub.get(), on_discovery_complete, holder) != NATS_OK)
      logger()->warn("service {}: completion callback not set; a few bytes stay allocated", name);
    impl_->subs.push_back(std::move(sub));
  }
  const natsStatus flushed =
      natsConnection_FlushTimeout(connection.native(), connection.config().connection.jetstream_timeout.count());
  if (flushed != NATS_OK)
    logger()->warn("service {}: subscriptions not confirmed yet: {}", name, detail::last_error_text(flushed));
  logger()->info("service {} {} (id {}) answers $SRV.PING/INFO/STATS", name, st.options.version, st.options.id);
}

Service::~Service() {
  if (impl_) stop();
}

Service& Service::add(const Responder& responder) {
  auto source = responder.stats_source();
  auto metadata = responder.metadata();
  return add_endpoints([source = std::move(source), metadata = std::move(metadata)] {
    return std::vector<ServiceEndpoint>{endpoint_of(source(), metadata)};
  });
}

Service& Service::add(const Consumer& consumer) {
  return add_endpoints([&consumer] {
    std::vector<ServiceEndpoint> out;
    for (const auto& s : consumer.stats()) out.push_back(endpoint_of(s));
    return out;
  });
}

Service& Service::add_endpoints(EndpointSource source) {
  if (!source) throw ConfigError("service.endpoints", "an endpoint source must be callable");
  std::lock_guard lock(impl_->state->mutex);
  impl_->state->sources.push_back(std::move(source));
  return *this;
}

nlohmann::json Service::ping() const { return impl_->state->ping(); }
nlohmann::json Service::info() const { return impl_->state->info(); }
nlohmann::json Service::stats() const { return impl_->state->stats(); }
const std::string& Service::name() const noexcept { return impl_->state->options.name; }
const std::string& Service::id() const noexcept { return impl_->state->options.id; }

void Service::stop(Millis timeout) {
  std::lock_guard lock(impl_->stop_mutex);
  if (impl_->subs.empty()) return;
  for (auto& sub : impl_->subs) natsSubscription_DrainTimeout(sub.get(), timeout.count());
  for (auto& sub : impl_->subs) natsSubscription_WaitForDrainCompletion(sub.get(), timeout.count());
  impl_->subs.clear();
  logger()->info("service {} (id {}) stopped", impl_->state->options.name, impl_->state->options.id);
}

// ---- health -----------------------------------------------------------------------------------

nlohmann::json HealthReport::to_json() const {
  nlohmann::json checks_json = nlohmann::json::object();
  for (const auto& c : checks)
    checks_json[c.name] = {{"ok", c.ok}, {"detail", c.detail}, {"took_ms", c.took.count()}};
  return {{"status", ok ? "ok" : "unavailable"},
          {"checked_at", format_timestamp(checked_at)},
          {"checks", std::move(checks_json)}};
}

Health::Health(const Connection& connection) : connection_(&connection) {}

Health& Health::add_check(std::string name, Check check) {
  if (name.empty()) throw ConfigError("health.check", "a check needs a name");
  if (!check) throw ConfigError("health.check." + name, "must be callable");
  std::lock_guard lock(mutex_);
  checks_.emplace_back(std::move(name), std::move(check));
  return *this;
}

namespace {

HealthReport finish(std::vector<HealthCheck> checks) {
  HealthReport r;
  r.checks = std::move(checks);
  r.ok = std::all_of(r.checks.begin(), r.checks.end(), [](const HealthCheck& c) { return c.ok; });
  r.checked_at = now_ms();
  return r;
}

Millis since(Clock::time_point start) { return std::chrono::duration_cast<Millis>(Clock::now() - start); }

}  // namespace

HealthReport Health::liveness() const {
  const auto start = Clock::now();
  const auto state = connection_->state();
  return finish({HealthCheck{"nats", state != ConnectionState::closed, to_string(state), since(start)}});
}

HealthReport Health::readiness() const {
  std::vector<HealthCheck> out;
  auto start = Clock::now();
  const ConnectionHealth h = connection_->health();  // state, plus a JetStream round trip when connected
  out.push_back({"nats", h.state == ConnectionState::connected, to_string(h.state), since(start)});
  std::string js_detail = h.jetstream ? "answering" : (h.state == ConnectionState::connected ? h.last_error : "not connected");
  out.push_back({"jetstream", h.jetstream, js_detail, since(start)});

  std::vector<std::pair<std::string, Check>> checks;
  {
    std::lock_guard lock(mutex_);
    checks = checks_;
  }
  for (const auto& [name, check] : checks) {
    start = Clock::now();
    HealthCheck c{name, true, "ok", Millis{0}};
    try {
      check();
    } catch (const std::exception& e) {
      c.ok = false;
      c.detail = e.what();
    } catch (...) {
      c.ok = false;
      c.detail = "non-standard exception";
    }
    c.took = since(start);
    out.push_back(std::move(c));
  }
  return finish(std::move(out));
}

}  // namespace natspubsub
