#include "http_server.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <stdexcept>

namespace natspubsub::workers {
namespace {

const char* reason(int status) {
  switch (status) {
    case 200: return "OK";
    case 404: return "Not Found";
    case 503: return "Service Unavailable";
    default: return "Error";
  }
}

}  // namespace

HttpServer::HttpServer(const std::string& address, Handler handler) : handler_(std::move(handler)) {
  auto colon = address.rfind(':');
  if (colon == std::string::npos) throw std::runtime_error("metrics address must be HOST:PORT, got " + address);
  std::string host = address.substr(0, colon);
  int port = 0;
  try {
    port = std::stoi(address.substr(colon + 1));
  } catch (...) {
    throw std::runtime_error("metrics address must be HOST:PORT, got " + address);
  }
  if (host.empty() || host == "localhost") host = "127.0.0.1";
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1)
    throw std::runtime_error("metrics address: not an IPv4 address: " + host);
  fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd_ < 0) throw std::runtime_error("metrics: socket() failed");
  int one = 1;
  setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(fd_, 16) != 0) {
    std::string err = std::strerror(errno);
    ::close(fd_);
    throw std::runtime_error("metrics: cannot listen on " + address + ": " + err);
  }
  socklen_t len = sizeof(addr);
  getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
  port_ = ntohs(addr.sin_port);
  thread_ = std::jthread([this](std::stop_token stop) { serve(stop); });
}

HttpServer::~HttpServer() {
  thread_.request_stop();
  if (thread_.joinable()) thread_.join();
  ::close(fd_);
}

void HttpServer::serve(std::stop_token stop) {
  while (!stop.stop_requested()) {
    pollfd p{fd_, POLLIN, 0};
    if (poll(&p, 1, 200) <= 0) continue;
    int client = accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (client < 0) continue;
    timeval tv{2, 0};
    setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(client, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    std::string request;
    char buf[2048];
    while (request.find("\r\n\r\n") == std::string::npos && request.size() < 8192) {
      auto n = ::recv(client, buf, sizeof(buf), 0);
      if (n <= 0) break;
      request.append(buf, static_cast<size_t>(n));
    }
    HttpResponse response{404, "text/plain", "not found\n"};
    auto sp1 = request.find(' ');
    auto sp2 = sp1 == std::string::npos ? sp1 : request.find(' ', sp1 + 1);
    if (sp2 != std::string::npos && request.compare(0, sp1, "GET") == 0) {
      std::string path = request.substr(sp1 + 1, sp2 - sp1 - 1);
      if (auto q = path.find('?'); q != std::string::npos) path.resize(q);
      try {
        response = handler_(path);
      } catch (const std::exception& e) {
        response = {500, "text/plain", std::string("error: ") + e.what() + "\n"};
      }
    }
    std::string out = "HTTP/1.0 " + std::to_string(response.status) + " " + reason(response.status) +
                      "\r\nContent-Type: " + response.content_type +
                      "\r\nContent-Length: " + std::to_string(response.body.size()) +
                      "\r\nConnection: close\r\n\r\n" + response.body;
    size_t sent = 0;
    while (sent < out.size()) {
      auto n = ::send(client, out.data() + sent, out.size() - sent, MSG_NOSIGNAL);
      if (n <= 0) break;
      sent += static_cast<size_t>(n);
    }
    ::close(client);
  }
}

}  // namespace natspubsub::workers
