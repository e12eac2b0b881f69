// TempDir, free_port, run_command, NatsServer and NatsCluster. PostgresServer is in
// postgres_server.cpp; process handling shared by both is in process.cpp.
#include "support/servers.hpp"

#include <nats/nats.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <system_error>
#include <thread>

#include "support/net.hpp"
#include "support/process.hpp"

namespace natspubsub::testing {
namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

constexpr auto kStartTimeout = std::chrono::seconds(15);
constexpr auto kStopGrace = std::chrono::seconds(10);

// Debian installs nats-server in /usr/sbin, which is not on a normal user's PATH.
const std::string& nats_server_binary() {
  static const std::string binary = [] {
    std::vector<fs::path> candidates;
    if (const char* path = std::getenv("PATH")) {
      std::stringstream entries(path);
      std::string entry;
      while (std::getline(entries, entry, ':'))
        if (!entry.empty()) candidates.emplace_back(fs::path(entry) / "nats-server");
    }
    candidates.emplace_back("/usr/sbin/nats-server");
    candidates.emplace_back("/usr/bin/nats-server");
    for (const auto& candidate : candidates)
      if (::access(candidate.c_str(), X_OK) == 0) return candidate.string();
    throw std::runtime_error("nats-server not found on PATH nor in /usr/sbin, /usr/bin (apt install nats-server)");
  }();
  return binary;
}

// nats-server config strings: double-quoted with backslash escapes.
std::string quoted(const std::string& value) {
  std::string out = "\"";
  for (const char c : value) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + '"';
}

std::string url_for(int port) { return "nats://127.0.0.1:" + std::to_string(port); }

// Connects with cnats and asks for the JetStream account info: the same path a real client
// takes, so "ready" means a client can use JetStream, not only that a port is open.
bool jetstream_answers(const std::vector<std::string>& urls, std::string& error) {
  natsOptions* raw_options = nullptr;
  if (natsOptions_Create(&raw_options) != NATS_OK) {
    error = "natsOptions_Create failed";
    return false;
  }
  std::unique_ptr<natsOptions, decltype(&natsOptions_Destroy)> options(raw_options, &natsOptions_Destroy);
  std::vector<const char*> servers;
  for (const auto& url : urls) servers.push_back(url.c_str());
  natsOptions_SetServers(options.get(), servers.data(), static_cast<int>(servers.size()));
  natsOptions_SetTimeout(options.get(), 2000);
  natsOptions_SetAllowReconnect(options.get(), false);

  natsConnection* raw_connection = nullptr;
  natsStatus status = natsConnection_Connect(&raw_connection, options.get());
  if (status != NATS_OK) {
    error = std::string("connect: ") + natsStatus_GetText(status);
    return false;
  }
  std::unique_ptr<natsConnection, decltype(&natsConnection_Destroy)> connection(raw_connection,
                                                                               &natsConnection_Destroy);
  jsOptions js_options;
  jsOptions_Init(&js_options);
  js_options.Wait = 2000;
  jsCtx* raw_js = nullptr;
  status = natsConnection_JetStream(&raw_js, connection.get(), &js_options);
  if (status != NATS_OK) {
    error = std::string("natsConnection_JetStream: ") + natsStatus_GetText(status);
    return false;
  }
  std::unique_ptr<jsCtx, decltype(&jsCtx_Destroy)> js(raw_js, &jsCtx_Destroy);
  jsAccountInfo* info = nullptr;
  jsErrCode js_error = static_cast<jsErrCode>(0);
  status = js_GetAccountInfo(&info, js.get(), nullptr, &js_error);
  if (status != NATS_OK) {
    error = std::string("js_GetAccountInfo: ") + natsStatus_GetText(status) + " (jsErrCode " +
            std::to_string(static_cast<int>(js_error)) + "): " + nats_GetLastError(nullptr);
    return false;
  }
  jsAccountInfo_Destroy(info);
  return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

TempDir::TempDir(const std::string& prefix) : TempDir(prefix, fs::temp_directory_path()) {}

TempDir::TempDir(const std::string& prefix, const std::filesystem::path& parent) {
  std::string pattern = (parent / (prefix + "-XXXXXX")).string();
  if (::mkdtemp(pattern.data()) == nullptr)
    throw std::system_error(errno, std::generic_category(), "mkdtemp " + pattern);
  path_ = pattern;
}

TempDir::~TempDir() {
  std::error_code ignored;
  fs::remove_all(path_, ignored);
}

int free_port() {
  // The kernel may hand the same ephemeral port out again right after we close it; a cluster
  // asks for several at once, so remember what this process already got.
  static std::mutex mutex;
  static std::set<int> handed_out;
  for (int attempt = 0; attempt < 100; ++attempt) {
    const int port = detail::bind_ephemeral_port();
    const std::lock_guard lock(mutex);
    if (handed_out.insert(port).second) return port;
  }
  throw std::runtime_error("free_port: no new free port after 100 attempts");
}

CommandResult run_command(const std::string& command, std::chrono::seconds timeout) {
  auto result = detail::run_process({"/bin/sh", "-c", command}, timeout);
  return CommandResult{result.status, std::move(result.out), std::move(result.err)};
}

// ---------------------------------------------------------------------------------------------

namespace {
struct ClusterMembership {
  std::string cluster_name;
  std::string server_name;
  int cluster_port = 0;
  std::vector<int> route_ports;  // the other nodes' cluster ports
};
}  // namespace

struct NatsServer::Impl {
  Options options;
  std::optional<ClusterMembership> membership;
  TempDir dir{"natspubsub-nats"};
  fs::path store = dir.path() / "store";
  fs::path config = dir.path() / "nats-server.conf";
  fs::path log = dir.path() / "nats-server.log";
  std::string name;
  int port = 0;
  int monitor_port = 0;
  std::uintmax_t log_offset = 0;  // where the current run's output starts in `log`
  detail::ChildProcess process;   // after `dir`: destroyed (killed) before the store is removed

  Impl(Options opts, std::optional<ClusterMembership> member)
      : options(std::move(opts)), membership(std::move(member)) {
    if (!options.token.empty() && !options.user.empty())
      throw std::invalid_argument("NatsServer: user/password and token auth are exclusive");
    assign_ports();
  }

  ~Impl() { process.kill_group(); }
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;

  void assign_ports() {
    port = free_port();
    monitor_port = free_port();
    name = membership ? membership->server_name : "natspubsub-test-" + std::to_string(port);
    write_config();
  }

  void write_config() const {
    std::ostringstream c;
    c << "# Generated by natspubsub tests/support/servers.cpp\n"
      << "server_name: " << quoted(name) << "\n"
      << "listen: \"127.0.0.1:" << port << "\"\n"
      << "http: \"127.0.0.1:" << monitor_port << "\"\n";
    if (options.max_payload > 0) c << "max_payload: " << options.max_payload << "\n";
    if (options.jetstream) {
      // Modest limits: several servers share a small CI machine.
      c << "jetstream {\n  store_dir: " << quoted(store.string())
        << "\n  max_memory_store: 256MB\n  max_file_store: 1GB\n}\n";
    }
    if (!options.user.empty()) {
      c << "authorization {\n  user: " << quoted(options.user) << "\n  password: " << quoted(options.password)
        << "\n}\n";
    } else if (!options.token.empty()) {
      c << "authorization {\n  token: " << quoted(options.token) << "\n}\n";
    }
    if (membership) {
      c << "cluster {\n  name: " << quoted(membership->cluster_name) << "\n  listen: \"127.0.0.1:"
        << membership->cluster_port << "\"\n  routes: [\n";
      for (const int route : membership->route_ports) c << "    \"nats-route://127.0.0.1:" << route << "\"\n";
      c << "  ]\n}\n";
    }
    c << options.extra_config << "\n";
    std::ofstream out(config, std::ios::trunc);
    out << c.str();
    if (!out.flush()) throw std::runtime_error("cannot write " + config.string());
  }

  void launch() {
    std::error_code ignored;
    const auto size = fs::file_size(log, ignored);
    log_offset = ignored ? 0 : size;
    process.spawn({{nats_server_binary(), "-c", config.string()}, log, dir.path(), std::nullopt});
  }

  // A cluster node cannot be fully healthy alone (no meta leader until a quorum runs), so a
  // node only waits for JetStream to be enabled; NatsCluster::wait_until_ready waits for the rest.
  [[nodiscard]] std::string health_target() const {
    return membership ? "/healthz?js-enabled-only=true" : "/healthz";
  }

  void wait_ready(Clock::time_point deadline) {
    std::string last = "no answer yet";
    for (;;) {
      if (!process.running())
        throw std::runtime_error(failure("nats-server " + process.last_exit() + " while starting"));
      if (!detail::tcp_listening(port)) {
        last = "nothing listening on client port " + std::to_string(port);
      } else if (const auto reply = detail::http_get(monitor_port, health_target()); !reply) {
        last = "monitoring port " + std::to_string(monitor_port) + " not answering";
      } else if (reply->status == 200) {
        return;
      } else {
        last = "GET " + health_target() + ": " + std::to_string(reply->status) + " " + reply->body;
      }
      if (Clock::now() >= deadline) {
        process.kill_group();
        throw std::runtime_error(failure("nats-server not ready in time: " + last));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
  }

  void start() {
    if (process.running()) return;
    launch();
    wait_ready(Clock::now() + kStartTimeout);
  }

  // Another process can take a port between free_port() and the server's bind.
  [[nodiscard]] bool port_conflict() const {
    return detail::contains_ignoring_case(detail::file_from(log, log_offset), "address already in use");
  }

  [[nodiscard]] std::string failure(const std::string& what) const {
    return what + " (" + url_for(port) + ", config " + config.string() + ")\n--- tail of " + log.string() +
           " ---\n" + detail::file_tail(log);
  }
};

NatsServer::NatsServer() : NatsServer(Options{}) {}

NatsServer::NatsServer(Options options) : impl_(std::make_unique<Impl>(std::move(options), std::nullopt)) {
  for (int attempt = 1;; ++attempt) {
    try {
      impl_->start();
      return;
    } catch (const std::exception&) {
      if (attempt >= 3 || !impl_->port_conflict()) throw;
      impl_->assign_ports();
    }
  }
}

NatsServer::NatsServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

NatsServer::~NatsServer() = default;

std::string NatsServer::url() const { return url_for(impl_->port); }
int NatsServer::port() const noexcept { return impl_->port; }
const std::filesystem::path& NatsServer::store_dir() const noexcept { return impl_->store; }
bool NatsServer::running() const noexcept { return impl_->process.running(); }
int NatsServer::pid() const noexcept { return impl_->process.pid(); }
const std::string& NatsServer::server_name() const noexcept { return impl_->name; }
std::filesystem::path NatsServer::log_file() const { return impl_->log; }

void NatsServer::start() { impl_->start(); }
void NatsServer::stop() { impl_->process.stop(SIGTERM, kStopGrace); }
void NatsServer::kill() { impl_->process.kill_group(); }

// ---------------------------------------------------------------------------------------------

struct NatsCluster::Impl {
  std::vector<std::unique_ptr<NatsServer>> nodes;

  void create(int count) {
    nodes.clear();
    std::vector<int> cluster_ports;
    for (int i = 0; i < count; ++i) cluster_ports.push_back(free_port());
    for (int i = 0; i < count; ++i) {
      ClusterMembership member{"natspubsub-test", "node-" + std::to_string(i), cluster_ports[i], {}};
      for (int j = 0; j < count; ++j)
        if (j != i) member.route_ports.push_back(cluster_ports[j]);
      auto node = std::make_unique<NatsServer::Impl>(NatsServer::Options{}, std::move(member));
      nodes.push_back(std::unique_ptr<NatsServer>(new NatsServer(std::move(node))));
    }
    // All at once: a node's JetStream waits for its peers, so sequential starts would be slow.
    for (auto& node : nodes) node->impl_->launch();
    const auto deadline = Clock::now() + kStartTimeout;
    for (auto& node : nodes) node->impl_->wait_ready(deadline);
  }

  [[nodiscard]] bool port_conflict() const {
    return std::any_of(nodes.begin(), nodes.end(), [](const auto& node) { return node->impl_->port_conflict(); });
  }
};

NatsCluster::NatsCluster(int nodes) : impl_(std::make_unique<Impl>()) {
  if (nodes < 1) throw std::invalid_argument("NatsCluster: need at least one node");
  for (int attempt = 1;; ++attempt) {
    try {
      impl_->create(nodes);
      wait_until_ready();
      return;
    } catch (const std::exception&) {
      if (attempt >= 3 || !impl_->port_conflict()) throw;
    }
  }
}

NatsCluster::~NatsCluster() = default;

std::vector<std::string> NatsCluster::urls() const {
  std::vector<std::string> result;
  for (const auto& node : impl_->nodes) result.push_back(node->url());
  return result;
}

std::string NatsCluster::url() const {
  std::string joined;
  for (const auto& node_url : urls()) joined += (joined.empty() ? "" : ",") + node_url;
  return joined;
}

int NatsCluster::size() const noexcept { return static_cast<int>(impl_->nodes.size()); }

NatsServer& NatsCluster::node(int i) { return *impl_->nodes.at(static_cast<std::size_t>(i)); }

void NatsCluster::wait_until_ready(std::chrono::seconds timeout) {
  const auto deadline = Clock::now() + timeout;
  std::string last;
  for (;;) {
    // A node's full /healthz is OK once it is in contact with a meta leader and caught up; only
    // running nodes count, so this also works with a node deliberately killed.
    std::vector<std::string> live;
    bool healthy = true;
    for (const auto& node : impl_->nodes) {
      if (!node->running()) continue;
      live.push_back(node->url());
      const auto reply = detail::http_get(node->impl_->monitor_port, "/healthz");
      if (!reply || reply->status != 200) {
        healthy = false;
        last = node->server_name() + " /healthz: " + (reply ? reply->body : "no answer");
      }
    }
    if (live.empty()) throw std::runtime_error("NatsCluster::wait_until_ready: no node is running");
    if (healthy && jetstream_answers(live, last)) return;
    if (Clock::now() >= deadline) {
      std::string message = "NatsCluster: JetStream not ready within " + std::to_string(timeout.count()) +
                            " s: " + last;
      for (const auto& node : impl_->nodes)
        message += "\n--- " + node->server_name() + " (" +
                   (node->running() ? std::string("running") : node->impl_->process.last_exit()) + "), tail of " +
                   node->impl_->log.string() + " ---\n" + detail::file_tail(node->impl_->log, 1500);
      throw std::runtime_error(message);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

}  // namespace natspubsub::testing
