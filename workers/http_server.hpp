#pragma once
// A minimal HTTP/1.0 server for /metrics and /healthz: one thread, one request per connection,
// bounded reads and timeouts. Enough for Prometheus and a load balancer's health probe; not a
// general web server.
#include <functional>
#include <string>
#include <thread>

namespace natspubsub::workers {

struct HttpResponse {
  int status = 200;
  std::string content_type = "text/plain; version=0.0.4";
  std::string body;
};

class HttpServer {
 public:
  using Handler = std::function<HttpResponse(const std::string& path)>;
  /// Binds `address` ("HOST:PORT"; port 0 picks a free one) or throws std::runtime_error.
  HttpServer(const std::string& address, Handler handler);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;
  [[nodiscard]] int port() const noexcept { return port_; }

 private:
  void serve(std::stop_token stop);
  int fd_ = -1;
  int port_ = 0;
  Handler handler_;
  std::jthread thread_;
};

}  // namespace natspubsub::workers
