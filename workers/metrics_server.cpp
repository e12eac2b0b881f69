#include "metrics_server.hpp"

#include <arpa/inet.h>

#include <charconv>
#include <stdexcept>

#include <CivetServer.h>
#include <prometheus/text_serializer.h>

namespace natspubsub::workers {
namespace {

void respond(mg_connection* conn, int status, const char* reason, const char* content_type, const std::string& body,
             bool with_body) {
  mg_printf(conn,
            "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nCache-Control: no-store\r\n"
            "Connection: close\r\n\r\n",
            status, reason, content_type, body.size());
  if (with_body) mg_write(conn, body.data(), body.size());
}

// One handler class for the four paths: GET and HEAD answer alike, HEAD without the body.
class Handler final : public CivetHandler {
 public:
  using Answer = std::function<void(mg_connection*, bool with_body)>;
  explicit Handler(Answer answer) : answer_(std::move(answer)) {}
  bool handleGet(CivetServer*, mg_connection* conn) override {
    answer_(conn, true);
    return true;
  }
  bool handleHead(CivetServer*, mg_connection* conn) override {
    answer_(conn, false);
    return true;
  }

 private:
  Answer answer_;
};

int parse_port(const std::string& text, const std::string& address) {
  int port = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), port);
  if (text.empty() || ec != std::errc() || end != text.data() + text.size() || port < 1 || port > 65535) {
    throw std::invalid_argument("--metrics-addr \"" + address + "\": the port must be a number from 1 to 65535");
  }
  return port;
}

}  // namespace

std::string parse_listen_address(const std::string& address) {
  auto colon = address.rfind(':');
  if (colon == std::string::npos) {
    throw std::invalid_argument("--metrics-addr \"" + address + "\": expected HOST:PORT, :PORT or [IPv6]:PORT");
  }
  auto host = address.substr(0, colon);
  auto port = std::to_string(parse_port(address.substr(colon + 1), address));
  if (host.empty()) {
    // The Prometheus convention: ":PORT" is every interface, IPv6 too when CivetWeb has it (feature 8).
    return (mg_check_feature(8) != 0 ? "+" : "") + port;
  }
  if (host == "localhost") return "127.0.0.1:" + port;
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') {
    in6_addr a6{};
    if (inet_pton(AF_INET6, host.substr(1, host.size() - 2).c_str(), &a6) == 1) {
      // Debian 12's CivetWeb 1.15 is built without IPv6: say so now rather than fail to bind later.
      if (mg_check_feature(8) == 0) {
        throw std::invalid_argument("--metrics-addr \"" + address + "\": this CivetWeb has no IPv6 support");
      }
      return host + ":" + port;
    }
  } else {
    in_addr a4{};
    if (inet_pton(AF_INET, host.c_str(), &a4) == 1) return host + ":" + port;
  }
  throw std::invalid_argument("--metrics-addr \"" + address +
                              "\": HOST must be an IPv4 address, [IPv6 address], localhost or empty (all interfaces)");
}

MetricsServer::MetricsServer(const std::string& listening_ports, Readiness readiness)
    : readiness_(std::move(readiness)) {
  auto probe = [this](mg_connection* conn, bool with_body) {
    HealthReport report;
    try {
      report = readiness_();
    } catch (const std::exception& e) {
      report.ok = false;
      HealthCheck failed;
      failed.name = "readiness";
      failed.detail = e.what();
      report.checks.push_back(std::move(failed));
    }
    respond(conn, report.ok ? 200 : 503, report.ok ? "OK" : "Service Unavailable", "application/json",
            report.to_json().dump() + "\n", with_body);
  };
  handlers_.push_back(std::make_unique<Handler>([this](mg_connection* conn, bool with_body) {
    respond(conn, 200, "OK", "text/plain; version=0.0.4; charset=utf-8", scrape(), with_body);
  }));
  handlers_.push_back(std::make_unique<Handler>(
      [](mg_connection* conn, bool with_body) { respond(conn, 200, "OK", "text/plain", "ok\n", with_body); }));
  handlers_.push_back(std::make_unique<Handler>(probe));
  handlers_.push_back(std::make_unique<Handler>(probe));
  try {
    server_ = std::make_unique<CivetServer>(std::vector<std::string>{
        "listening_ports", listening_ports, "num_threads", "2", "request_timeout_ms", "10000"});
  } catch (const CivetException& e) {
    throw std::runtime_error("cannot listen on " + listening_ports + ": " + e.what());
  }
  // "$": the exact path, not every path below it.
  server_->addHandler("/metrics$", *handlers_[0]);
  server_->addHandler("/livez$", *handlers_[1]);
  server_->addHandler("/readyz$", *handlers_[2]);
  server_->addHandler("/healthz$", *handlers_[3]);
}

MetricsServer::~MetricsServer() {
  if (server_) server_->close();
}

void MetricsServer::add_collectable(std::shared_ptr<prometheus::Collectable> collectable) {
  std::lock_guard lock(mutex_);
  collectables_.push_back(std::move(collectable));
}

std::vector<int> MetricsServer::ports() const { return const_cast<CivetServer&>(*server_).getListeningPorts(); }

std::string MetricsServer::scrape() const {
  std::vector<prometheus::MetricFamily> families;
  {
    std::lock_guard lock(mutex_);
    for (const auto& c : collectables_) {
      auto f = c->Collect();
      families.insert(families.end(), std::make_move_iterator(f.begin()), std::make_move_iterator(f.end()));
    }
  }
  return prometheus::TextSerializer().Serialize(families);
}

}  // namespace natspubsub::workers
