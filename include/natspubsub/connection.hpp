#pragma once
// One NATS connection with its JetStream context. Connects in the constructor (or throws),
// reconnects forever by default with a jittered wait, and reports its state through callbacks.
//
//   natspubsub::ConnectionEvents events;
//   events.on_disconnected = [] { spdlog::warn("NATS down"); };
//   natspubsub::Connection nats(config, events);
//   if (nats.health().ready()) { ... }
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include <natspubsub/config.hpp>

// The cnats handle types, so that this header does not need nats.h.
typedef struct __natsConnection natsConnection;  // NOLINT
typedef struct __jsCtx jsCtx;                    // NOLINT

namespace natspubsub {

enum class ConnectionState { connected, disconnected, reconnecting, closed };

[[nodiscard]] const char* to_string(ConnectionState state) noexcept;

/// Called from cnats' callback thread: keep them short and never throw.
struct ConnectionEvents {
  std::function<void()> on_connected;     ///< the first successful connect
  std::function<void()> on_disconnected;
  std::function<void()> on_reconnected;
  std::function<void()> on_closed;        ///< final: no more reconnects
  std::function<void(const std::string&)> on_error;  ///< async errors (slow consumer, permissions, ...)
};

struct ConnectionHealth {
  ConnectionState state = ConnectionState::closed;
  bool jetstream = false;      ///< the JetStream API answered (checked by health())
  std::string server;          ///< the server we are connected to (no credentials)
  uint64_t reconnects = 0;
  std::string last_error;
  [[nodiscard]] bool live() const noexcept { return state != ConnectionState::closed; }
  [[nodiscard]] bool ready() const noexcept { return state == ConnectionState::connected && jetstream; }
};

/// Owns a natsConnection and its jsCtx. Move-only; destroying it closes the connection.
class Connection {
 public:
  /// Validates `config`, then connects. Throws ConfigError, AuthError (wrong credentials; the
  /// message never holds the secret) or ConnectionError (no server reachable, TLS failure).
  explicit Connection(const Config& config, ConnectionEvents events = {});
  ~Connection();
  Connection(Connection&&) noexcept;
  Connection& operator=(Connection&&) noexcept;
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  [[nodiscard]] const Config& config() const noexcept;
  [[nodiscard]] natsConnection* native() const noexcept;
  [[nodiscard]] jsCtx* jetstream() const noexcept;

  [[nodiscard]] ConnectionState state() const noexcept;
  [[nodiscard]] bool connected() const noexcept { return state() == ConnectionState::connected; }
  /// State plus a JetStream round trip (bounded by jetstream_timeout).
  [[nodiscard]] ConnectionHealth health() const;

  /// Sends everything buffered and waits for the server to confirm (bounded).
  void flush(Millis timeout = Millis{5000}) const;
  /// Drains subscriptions and publishes, then closes (bounded). Safe to call twice.
  void drain(Millis timeout = Millis{10000});
  /// Closes now. Safe to call twice.
  void close() noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace natspubsub
