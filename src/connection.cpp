#include <natspubsub/connection.hpp>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <vector>

#include <natspubsub/log.hpp>

#include "nats_util.hpp"

namespace natspubsub {
namespace {

// Shared between the Connection and cnats' callback thread. cnats may deliver the closed
// callback after natsConnection_Close() returns, so the state outlives the Connection until
// that last callback has run.
struct CallbackState {
  ConnectionEvents events;
  std::atomic<ConnectionState> state{ConnectionState::disconnected};
  std::atomic<uint64_t> reconnects{0};
  std::mutex mutex;
  std::condition_variable closed_cv;
  bool closed = false;
  std::string last_error;
};

struct Closure {
  std::shared_ptr<CallbackState> state;
};

template <typename F>
void call_safely(const char* what, F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    logger()->error("connection {} callback threw: {}", what, e.what());
  } catch (...) {
    logger()->error("connection {} callback threw a non-standard exception", what);
  }
}

void on_disconnected(natsConnection*, void* closure) {
  auto& s = *static_cast<Closure*>(closure)->state;
  if (s.state.load() == ConnectionState::closed) return;
  s.state = ConnectionState::reconnecting;
  logger()->warn("NATS connection lost; reconnecting");
  if (s.events.on_disconnected) call_safely("disconnected", s.events.on_disconnected);
}

void on_reconnected(natsConnection* nc, void* closure) {
  auto& s = *static_cast<Closure*>(closure)->state;
  s.state = ConnectionState::connected;
  s.reconnects.fetch_add(1);
  char url[256] = {0};
  natsConnection_GetConnectedUrl(nc, url, sizeof(url));
  logger()->info("NATS reconnected to {}", redact_url(url));
  if (s.events.on_reconnected) call_safely("reconnected", s.events.on_reconnected);
}

void on_connected(natsConnection*, void* closure) {
  // Only used with retry_on_failed_connect: the first connect happened in the background.
  auto& s = *static_cast<Closure*>(closure)->state;
  s.state = ConnectionState::connected;
  logger()->info("NATS connected");
  if (s.events.on_connected) call_safely("connected", s.events.on_connected);
}

void on_closed(natsConnection*, void* closure) {
  auto* c = static_cast<Closure*>(closure);
  auto state = c->state;
  state->state = ConnectionState::closed;
  if (state->events.on_closed) call_safely("closed", state->events.on_closed);
  {
    std::lock_guard lock(state->mutex);
    state->closed = true;
  }
  state->closed_cv.notify_all();
  delete c;
}

void on_error(natsConnection* nc, natsSubscription*, natsStatus err, void* closure) {
  auto& s = *static_cast<Closure*>(closure)->state;
  const char* text = nullptr;
  natsConnection_GetLastError(nc, &text);
  std::string message = text != nullptr && *text ? text : natsStatus_GetText(err);
  {
    std::lock_guard lock(s.mutex);
    s.last_error = message;
  }
  logger()->error("NATS async error: {}", message);
  if (s.events.on_error) call_safely("error", [&] { s.events.on_error(message); });
}

// Removes secrets from a message before it reaches an exception or a log line.
std::string scrub(std::string text, const Credentials& credentials) {
  for (const auto* secret : {&credentials.password, &credentials.token}) {
    if (secret->empty()) continue;
    for (auto pos = text.find(*secret); pos != std::string::npos; pos = text.find(*secret, pos)) {
      text.replace(pos, secret->size(), "***");
    }
  }
  return text;
}

}  // namespace

const char* to_string(ConnectionState state) noexcept {
  switch (state) {
    case ConnectionState::connected: return "connected";
    case ConnectionState::disconnected: return "disconnected";
    case ConnectionState::reconnecting: return "reconnecting";
    case ConnectionState::closed: return "closed";
  }
  return "unknown";
}

struct Connection::Impl {
  Config config;
  std::shared_ptr<CallbackState> callbacks = std::make_shared<CallbackState>();
  Closure* closure = nullptr;  // owned by cnats' closed callback once connected
  detail::ConnectionPtr nc;
  detail::JsPtr js;

  ~Impl() { close(); }

  void close() noexcept {
    if (!nc) return;
    // A deliberate close is not a lost connection: the disconnected callback must not say so.
    callbacks->state = ConnectionState::closed;
    js.reset();
    natsConnection_Close(nc.get());
    {
      // Bounded: cnats delivers the closed callback on its own thread.
      std::unique_lock lock(callbacks->mutex);
      callbacks->closed_cv.wait_for(lock, std::chrono::seconds(5), [&] { return callbacks->closed; });
    }
    nc.reset();
  }
};

Connection::Connection(const Config& config, ConnectionEvents events) : impl_(std::make_unique<Impl>()) {
  config.validate();
  impl_->config = config;
  impl_->callbacks->events = std::move(events);
  const auto& c = impl_->config;
  const auto& conn = c.connection;

  natsOptions* raw_opts = nullptr;
  detail::check(natsOptions_Create(&raw_opts), "creating NATS options");
  detail::OptionsPtr opts(raw_opts);

  std::vector<const char*> urls;
  for (const auto& s : c.servers) urls.push_back(s.c_str());
  detail::check(natsOptions_SetServers(opts.get(), urls.data(), static_cast<int>(urls.size())), "setting servers");
  const auto name = c.client_name();
  detail::check(natsOptions_SetName(opts.get(), name.c_str()), "setting client name");
  detail::check(natsOptions_SetTimeout(opts.get(), conn.connect_timeout.count()), "setting connect timeout");
  detail::check(natsOptions_SetMaxReconnect(opts.get(), conn.max_reconnect_attempts), "setting max reconnect");
  detail::check(natsOptions_SetReconnectWait(opts.get(), conn.reconnect_wait.count()), "setting reconnect wait");
  detail::check(natsOptions_SetReconnectJitter(opts.get(), conn.reconnect_jitter.count(), conn.reconnect_jitter.count()),
                "setting reconnect jitter");
  detail::check(natsOptions_SetReconnectBufSize(opts.get(), conn.reconnect_buffer_bytes), "setting reconnect buffer");
  detail::check(natsOptions_SetPingInterval(opts.get(), conn.ping_interval.count()), "setting ping interval");

  const auto& cr = c.credentials;
  if (!cr.user.empty())
    detail::check(natsOptions_SetUserInfo(opts.get(), cr.user.c_str(), cr.password.c_str()), "setting user");
  if (!cr.token.empty()) detail::check(natsOptions_SetToken(opts.get(), cr.token.c_str()), "setting token");
  if (!cr.creds_file.empty())
    detail::check(natsOptions_SetUserCredentialsFromFiles(opts.get(), cr.creds_file.c_str(), nullptr),
                  "loading creds file");
  if (!cr.nkey_seed_file.empty())
    detail::check(natsOptions_SetNKeyFromSeed(opts.get(), cr.nkey_public_key.c_str(), cr.nkey_seed_file.c_str()),
                  "loading nkey seed file");

  bool tls = c.tls.enabled || !c.tls.ca_file.empty() || !c.tls.cert_file.empty();
  for (const auto& s : c.servers) tls = tls || s.rfind("tls://", 0) == 0;
  if (tls) {
    detail::check(natsOptions_SetSecure(opts.get(), true), "enabling TLS");
    if (!c.tls.ca_file.empty())
      detail::check(natsOptions_LoadCATrustedCertificates(opts.get(), c.tls.ca_file.c_str()), "loading TLS CA file");
    if (!c.tls.cert_file.empty())
      detail::check(natsOptions_LoadCertificatesChain(opts.get(), c.tls.cert_file.c_str(), c.tls.key_file.c_str()),
                    "loading TLS client certificate");
    if (!c.tls.expected_hostname.empty())
      detail::check(natsOptions_SetExpectedHostname(opts.get(), c.tls.expected_hostname.c_str()),
                    "setting TLS hostname");
  }

  impl_->closure = new Closure{impl_->callbacks};
  void* closure = impl_->closure;
  natsOptions_SetDisconnectedCB(opts.get(), on_disconnected, closure);
  natsOptions_SetReconnectedCB(opts.get(), on_reconnected, closure);
  natsOptions_SetClosedCB(opts.get(), on_closed, closure);
  natsOptions_SetErrorHandler(opts.get(), on_error, closure);
  if (conn.retry_on_failed_connect)
    natsOptions_SetRetryOnFailedConnect(opts.get(), true, on_connected, closure);

  natsConnection* raw_nc = nullptr;
  natsStatus s = natsConnection_Connect(&raw_nc, opts.get());
  if (s != NATS_OK && s != NATS_NOT_YET_CONNECTED) {
    // No connection object exists, so cnats will never call the closed callback.
    delete impl_->closure;
    impl_->closure = nullptr;
    std::string servers;
    for (const auto& url : c.servers) servers += (servers.empty() ? "" : ",") + redact_url(url);
    std::string detail = scrub(detail::last_error_text(s), cr);
    if (s == NATS_CONNECTION_AUTH_FAILED)
      throw AuthError("NATS refused the credentials for " + servers + ": " + detail, s);
    if (s == NATS_SSL_ERROR) throw ConnectionError("TLS handshake with " + servers + " failed: " + detail, s);
    // A server that requires client certificates drops a client without one right after the
    // handshake; cnats then only says it got no PONG. Name the likely cause.
    if (tls && c.tls.cert_file.empty() && detail.find("PONG") != std::string::npos)
      detail += " (the server closed the TLS connection; if it requires client certificates, set tls.cert_file "
                "and tls.key_file)";
    throw ConnectionError("cannot connect to NATS at " + servers + ": " + detail, s);
  }
  impl_->nc.reset(raw_nc);
  impl_->callbacks->state = s == NATS_OK ? ConnectionState::connected : ConnectionState::reconnecting;

  jsOptions jopts;
  jsOptions_Init(&jopts);
  jopts.Wait = conn.jetstream_timeout.count();
  jsCtx* raw_js = nullptr;
  detail::check(natsConnection_JetStream(&raw_js, raw_nc, &jopts), "creating JetStream context");
  impl_->js.reset(raw_js);

  if (s == NATS_OK) {
    if (impl_->callbacks->events.on_connected) call_safely("connected", impl_->callbacks->events.on_connected);
    char url[256] = {0};
    natsConnection_GetConnectedUrl(raw_nc, url, sizeof(url));
    logger()->info("connected to NATS at {} as {}", redact_url(url), name);
  } else {
    logger()->warn("NATS not reachable yet; connecting in the background");
  }
}

Connection::~Connection() = default;
Connection::Connection(Connection&&) noexcept = default;
Connection& Connection::operator=(Connection&&) noexcept = default;

const Config& Connection::config() const noexcept { return impl_->config; }
natsConnection* Connection::native() const noexcept { return impl_ ? impl_->nc.get() : nullptr; }
jsCtx* Connection::jetstream() const noexcept { return impl_ ? impl_->js.get() : nullptr; }

ConnectionState Connection::state() const noexcept {
  if (!impl_ || !impl_->nc) return ConnectionState::closed;
  return impl_->callbacks->state.load();
}

ConnectionHealth Connection::health() const {
  ConnectionHealth h;
  h.state = state();
  if (!impl_ || !impl_->nc) return h;
  h.reconnects = impl_->callbacks->reconnects.load();
  {
    std::lock_guard lock(impl_->callbacks->mutex);
    h.last_error = impl_->callbacks->last_error;
  }
  char url[256] = {0};
  if (natsConnection_GetConnectedUrl(impl_->nc.get(), url, sizeof(url)) == NATS_OK) h.server = redact_url(url);
  if (h.state == ConnectionState::connected) {
    jsAccountInfo* info = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    natsStatus s = js_GetAccountInfo(&info, impl_->js.get(), nullptr, &jerr);
    detail::AccountInfoPtr owned(info);
    h.jetstream = s == NATS_OK;
    if (s != NATS_OK) h.last_error = "JetStream: " + detail::last_error_text(s);
  }
  return h;
}

void Connection::flush(Millis timeout) const {
  detail::check(natsConnection_FlushTimeout(native(), timeout.count()), "flushing the NATS connection");
}

void Connection::drain(Millis timeout) {
  if (!impl_ || !impl_->nc) return;
  natsStatus s = natsConnection_DrainTimeout(impl_->nc.get(), timeout.count());
  if (s == NATS_OK) {
    // Drain ends with the connection closed; wait for that, bounded by the drain timeout.
    std::unique_lock lock(impl_->callbacks->mutex);
    impl_->callbacks->closed_cv.wait_for(lock, timeout + Millis{1000}, [&] { return impl_->callbacks->closed; });
  }
  impl_->close();
}

void Connection::close() noexcept {
  if (impl_) impl_->close();
}

}  // namespace natspubsub
