#pragma once
// Loopback probes used to decide when a server fixture is ready. Internal to tests/support.
#include <optional>
#include <string>

namespace natspubsub::testing::detail {

/// Binds 127.0.0.1:0, returns the port the kernel chose, and releases it.
int bind_ephemeral_port();

/// True if a socket is listening on 127.0.0.1:port. Read from /proc/net/tcp rather than by
/// connecting: a probe connection counts against a server's max_connections until it notices
/// the close, and would make the test's first real connection fail.
bool tcp_listening(int port);

struct HttpReply {
  int status = 0;
  std::string body;
};

/// A plain HTTP/1.0 GET to 127.0.0.1:port (the nats-server monitoring port); nullopt if nothing
/// answers within about two seconds.
std::optional<HttpReply> http_get(int port, const std::string& target);

}  // namespace natspubsub::testing::detail
