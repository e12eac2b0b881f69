#include <natspubsub/config.hpp>

#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>

#include <natspubsub/error.hpp>
#include <natspubsub/subject.hpp>

namespace natspubsub {
namespace {

using nlohmann::json;

constexpr std::string_view kRedacted = "***";

// Reads typed values out of a JSON object, naming the full path of a bad key in the error
// and refusing keys nobody reads (a typo must not silently fall back to a default).
class JsonReader {
 public:
  JsonReader(const json& j, std::string path) : j_(j), path_(std::move(path)) {
    if (!j_.is_object()) throw ConfigError(path_.empty() ? "(root)" : path_, "must be a JSON object");
  }

  [[nodiscard]] std::string field(std::string_view key) const {
    return path_.empty() ? std::string(key) : path_ + "." + std::string(key);
  }

  const json* find(std::string_view key) {
    seen_.insert(std::string(key));
    auto it = j_.find(std::string(key));
    return it == j_.end() || it->is_null() ? nullptr : &*it;
  }

  void read(std::string_view key, std::string& out) {
    if (auto* v = find(key)) {
      if (!v->is_string()) throw ConfigError(field(key), "must be a string");
      out = v->get<std::string>();
    }
  }
  void read(std::string_view key, bool& out) {
    if (auto* v = find(key)) {
      if (!v->is_boolean()) throw ConfigError(field(key), "must be true or false");
      out = v->get<bool>();
    }
  }
  template <typename Int>
  void read_int(std::string_view key, Int& out) {
    if (auto* v = find(key)) {
      if (!v->is_number_integer()) throw ConfigError(field(key), "must be an integer");
      out = static_cast<Int>(v->get<int64_t>());
    }
  }
  void read(std::string_view key, int& out) { read_int(key, out); }
  void read(std::string_view key, int64_t& out) { read_int(key, out); }
  void read(std::string_view key, Millis& out) {
    int64_t ms = out.count();
    read_int(key, ms);
    out = Millis{ms};
  }
  void read(std::string_view key, std::vector<Millis>& out) {
    if (auto* v = find(key)) {
      if (!v->is_array()) throw ConfigError(field(key), "must be an array of milliseconds");
      out.clear();
      for (const auto& e : *v) {
        if (!e.is_number_integer()) throw ConfigError(field(key), "must be an array of integers (milliseconds)");
        out.emplace_back(e.get<int64_t>());
      }
    }
  }
  void read(std::string_view key, std::vector<std::string>& out) {
    if (auto* v = find(key)) {
      if (v->is_string()) {
        out = {v->get<std::string>()};
        return;
      }
      if (!v->is_array()) throw ConfigError(field(key), "must be a string or an array of strings");
      out.clear();
      for (const auto& e : *v) {
        if (!e.is_string()) throw ConfigError(field(key), "must be an array of strings");
        out.push_back(e.get<std::string>());
      }
    }
  }

  void reject_unknown() const {
    for (const auto& [key, value] : j_.items()) {
      if (!seen_.count(key)) throw ConfigError(field(key), "unknown setting");
    }
  }

 private:
  const json& j_;
  std::string path_;
  std::set<std::string> seen_;
};

std::vector<std::string> split_list(std::string_view text) {
  std::vector<std::string> out;
  std::string item;
  std::istringstream in{std::string(text)};
  while (std::getline(in, item, ',')) {
    auto b = item.find_first_not_of(" \t");
    auto e = item.find_last_not_of(" \t");
    if (b != std::string::npos) out.push_back(item.substr(b, e - b + 1));
  }
  return out;
}

const char* env_value(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? v : nullptr;
}

int64_t env_int(const char* name, int64_t current) {
  const char* v = env_value(name);
  if (v == nullptr) return current;
  char* end = nullptr;
  errno = 0;
  long long parsed = std::strtoll(v, &end, 10);
  if (errno != 0 || end == v || *end != '\0') throw ConfigError(name, "must be an integer");
  return parsed;
}

bool env_bool(const char* name, bool current) {
  const char* v = env_value(name);
  if (v == nullptr) return current;
  std::string s(v);
  if (s == "1" || s == "true" || s == "yes" || s == "on") return true;
  if (s == "0" || s == "false" || s == "no" || s == "off") return false;
  throw ConfigError(name, "must be true or false");
}

void env_string(const char* name, std::string& out) {
  if (const char* v = env_value(name)) out = v;
}

bool file_readable(const std::string& path) {
  std::ifstream f(path);
  return f.good();
}

void check_positive(const std::string& field, Millis value) {
  if (value.count() <= 0) throw ConfigError(field, "must be greater than 0 ms");
}

}  // namespace

std::string redact_url(std::string_view url) {
  auto scheme = url.find("://");
  auto start = scheme == std::string_view::npos ? 0 : scheme + 3;
  auto end = url.find_first_of("/?#", start);
  auto authority = url.substr(start, end == std::string_view::npos ? std::string_view::npos : end - start);
  auto at = authority.rfind('@');
  if (at == std::string_view::npos) return std::string(url);
  std::string out(url.substr(0, start));
  out += kRedacted;
  out += url.substr(start + at);
  return out;
}

Config Config::development(std::string app) {
  Config c;
  c.env = "development";
  c.app = std::move(app);
  c.consumer.max_attempts = 3;
  c.consumer.backoff = {Millis{500}, Millis{2000}, Millis{5000}};
  return c;
}

Config Config::production(std::string app) {
  Config c;
  c.env = "production";
  c.app = std::move(app);
  c.stream.replicas = 3;
  c.consumer.max_attempts = 5;
  c.consumer.ack_wait = Millis{30000};
  c.consumer.backoff = {Millis{1000}, Millis{5000}, Millis{30000}, Millis{120000}, Millis{600000}};
  c.connection.retry_on_failed_connect = true;
  return c;
}

Config Config::testing(std::string app) {
  Config c;
  c.env = "test";
  c.app = std::move(app);
  c.stream.memory_storage = true;
  c.consumer.max_attempts = 3;
  c.consumer.ack_wait = Millis{5000};
  c.consumer.backoff = {Millis{50}, Millis{100}, Millis{200}};
  c.consumer.fetch_timeout = Millis{200};
  c.connection.reconnect_wait = Millis{100};
  c.connection.reconnect_jitter = Millis{100};
  return c;
}

Config Config::preset(std::string_view name, std::string app) {
  if (name == "development") return development(std::move(app));
  if (name == "production") return production(std::move(app));
  if (name == "testing" || name == "test") return testing(std::move(app));
  throw ConfigError("preset", "must be development, production or testing");
}

const char* to_string(TopologyMode mode) noexcept {
  switch (mode) {
    case TopologyMode::standard: return "standard";
    case TopologyMode::natspubsub: return "natspubsub";
  }
  return "unknown";
}

TopologyMode parse_topology_mode(std::string_view text, const std::string& field) {
  if (text == "standard") return TopologyMode::standard;
  if (text == "natspubsub") return TopologyMode::natspubsub;
  throw ConfigError(field, "must be standard or natspubsub (got \"" + std::string(text) + "\")");
}

Config Config::from_json(const json& j) {
  JsonReader root(j, "");
  Config c;
  if (const auto* p = root.find("preset")) {
    if (!p->is_string()) throw ConfigError("preset", "must be a string");
    c = preset(p->get<std::string>(), "");
  }
  root.read("servers", c.servers);
  root.read("env", c.env);
  root.read("app", c.app);
  if (const auto* v = root.find("topology")) {
    if (!v->is_string()) throw ConfigError("topology", "must be a string: standard or natspubsub");
    c.topology = parse_topology_mode(v->get<std::string>());
  }
  if (const auto* v = root.find("credentials")) {
    JsonReader r(*v, "credentials");
    r.read("user", c.credentials.user);
    r.read("password", c.credentials.password);
    r.read("token", c.credentials.token);
    r.read("nkey_public_key", c.credentials.nkey_public_key);
    r.read("nkey_seed_file", c.credentials.nkey_seed_file);
    r.read("creds_file", c.credentials.creds_file);
    r.reject_unknown();
  }
  if (const auto* v = root.find("tls")) {
    JsonReader r(*v, "tls");
    r.read("enabled", c.tls.enabled);
    r.read("ca_file", c.tls.ca_file);
    r.read("cert_file", c.tls.cert_file);
    r.read("key_file", c.tls.key_file);
    r.read("expected_hostname", c.tls.expected_hostname);
    r.reject_unknown();
  }
  if (const auto* v = root.find("connection")) {
    JsonReader r(*v, "connection");
    r.read("name", c.connection.name);
    r.read("connect_timeout_ms", c.connection.connect_timeout);
    r.read("reconnect_wait_ms", c.connection.reconnect_wait);
    r.read("reconnect_jitter_ms", c.connection.reconnect_jitter);
    r.read("max_reconnect_attempts", c.connection.max_reconnect_attempts);
    r.read("reconnect_buffer_bytes", c.connection.reconnect_buffer_bytes);
    r.read("ping_interval_ms", c.connection.ping_interval);
    r.read("retry_on_failed_connect", c.connection.retry_on_failed_connect);
    r.read("jetstream_timeout_ms", c.connection.jetstream_timeout);
    r.reject_unknown();
  }
  if (const auto* v = root.find("stream")) {
    JsonReader r(*v, "stream");
    r.read("replicas", c.stream.replicas);
    r.read("memory_storage", c.stream.memory_storage);
    r.read("duplicate_window_ms", c.stream.duplicate_window);
    r.read("max_age_ms", c.stream.max_age);
    r.read("max_bytes", c.stream.max_bytes);
    r.read("max_msgs", c.stream.max_msgs);
    r.reject_unknown();
  }
  if (const auto* v = root.find("consumer")) {
    JsonReader r(*v, "consumer");
    r.read("concurrency", c.consumer.concurrency);
    r.read("max_attempts", c.consumer.max_attempts);
    r.read("ack_wait_ms", c.consumer.ack_wait);
    r.read("max_ack_pending", c.consumer.max_ack_pending);
    r.read("backoff_ms", c.consumer.backoff);
    r.read("fetch_timeout_ms", c.consumer.fetch_timeout);
    r.reject_unknown();
  }
  root.reject_unknown();
  return c;
}

Config Config::from_json_file(const std::filesystem::path& path) {
  std::error_code ec;
  // An ifstream opens a directory and then throws std::ios_base::failure on the first read.
  if (std::filesystem::is_directory(path, ec)) throw ConfigError("config file", path.string() + " is a directory");
  std::ifstream in(path);
  if (!in) throw ConfigError("config file", "cannot read " + path.string());
  json j;
  try {
    j = json::parse(in, nullptr, false);
  } catch (const std::exception&) {
    throw ConfigError("config file", "cannot read " + path.string());
  }
  if (j.is_discarded()) throw ConfigError("config file", path.string() + " is not valid JSON");
  return from_json(j);
}

Config Config::from_env() { return from_env(Config{}); }

Config Config::from_env(Config c) {
  if (const char* preset_name = env_value("NATSPUBSUB_PRESET")) c = preset(preset_name, c.app);
  if (const char* v = env_value("NATS_URL")) c.servers = split_list(v);
  if (const char* v = env_value("NATSPUBSUB_SERVERS")) c.servers = split_list(v);
  env_string("NATSPUBSUB_ENV", c.env);
  env_string("NATSPUBSUB_APP", c.app);
  if (const char* v = env_value("NATSPUBSUB_TOPOLOGY")) c.topology = parse_topology_mode(v, "NATSPUBSUB_TOPOLOGY");
  env_string("NATSPUBSUB_USER", c.credentials.user);
  env_string("NATSPUBSUB_PASSWORD", c.credentials.password);
  env_string("NATSPUBSUB_TOKEN", c.credentials.token);
  env_string("NATSPUBSUB_NKEY_PUBLIC_KEY", c.credentials.nkey_public_key);
  env_string("NATSPUBSUB_NKEY_SEED_FILE", c.credentials.nkey_seed_file);
  env_string("NATS_CREDS", c.credentials.creds_file);  // as the nats CLI reads it; ours wins when both are set
  env_string("NATSPUBSUB_CREDS_FILE", c.credentials.creds_file);
  c.tls.enabled = env_bool("NATSPUBSUB_TLS", c.tls.enabled);
  env_string("NATSPUBSUB_TLS_CA_FILE", c.tls.ca_file);
  env_string("NATSPUBSUB_TLS_CERT_FILE", c.tls.cert_file);
  env_string("NATSPUBSUB_TLS_KEY_FILE", c.tls.key_file);
  env_string("NATSPUBSUB_TLS_HOSTNAME", c.tls.expected_hostname);
  env_string("NATSPUBSUB_CLIENT_NAME", c.connection.name);
  c.connection.connect_timeout = Millis{env_int("NATSPUBSUB_CONNECT_TIMEOUT_MS", c.connection.connect_timeout.count())};
  c.connection.max_reconnect_attempts =
      static_cast<int>(env_int("NATSPUBSUB_MAX_RECONNECT_ATTEMPTS", c.connection.max_reconnect_attempts));
  c.stream.replicas = static_cast<int>(env_int("NATSPUBSUB_STREAM_REPLICAS", c.stream.replicas));
  c.consumer.concurrency = static_cast<int>(env_int("NATSPUBSUB_CONCURRENCY", c.consumer.concurrency));
  c.consumer.max_attempts = static_cast<int>(env_int("NATSPUBSUB_MAX_ATTEMPTS", c.consumer.max_attempts));
  c.consumer.ack_wait = Millis{env_int("NATSPUBSUB_ACK_WAIT_MS", c.consumer.ack_wait.count())};
  c.consumer.max_ack_pending = static_cast<int>(env_int("NATSPUBSUB_MAX_ACK_PENDING", c.consumer.max_ack_pending));
  return c;
}

void Config::validate() const {
  if (servers.empty()) throw ConfigError("servers", "at least one server URL is required");
  for (size_t i = 0; i < servers.size(); ++i) {
    const auto field = "servers[" + std::to_string(i) + "]";
    const auto& url = servers[i];
    // The message shows the redacted URL: a password inside a URL must not leak.
    const auto shown = redact_url(url);
    auto scheme_end = url.find("://");
    if (scheme_end != std::string::npos) {
      auto scheme = url.substr(0, scheme_end);
      if (scheme != "nats" && scheme != "tls")
        throw ConfigError(field, "scheme must be nats:// or tls:// (got " + shown + ")");
    }
    auto host_start = scheme_end == std::string::npos ? 0 : scheme_end + 3;
    auto rest = url.substr(host_start);
    if (auto at = rest.rfind('@'); at != std::string::npos) rest = rest.substr(at + 1);
    if (rest.empty() || rest.front() == ':' || rest.find_first_of(" \t") != std::string::npos)
      throw ConfigError(field, "must name a host, like nats://127.0.0.1:4222 (got " + shown + ")");
    if (auto colon = rest.rfind(':'); colon != std::string::npos && rest.find(']') == std::string::npos) {
      auto port = rest.substr(colon + 1);
      if (auto slash = port.find('/'); slash != std::string::npos) port = port.substr(0, slash);
      bool digits = !port.empty() && port.find_first_not_of("0123456789") == std::string::npos;
      if (!digits || port.size() > 5 || std::stoi(port) == 0 || std::stoi(port) > 65535)
        throw ConfigError(field, "port must be 1-65535 (got " + shown + ")");
    }
  }
  if (!subject::is_valid_token(env)) throw ConfigError("env", "must be one token of letters, digits, '_' or '-'");
  if (app.empty()) throw ConfigError("app", "is required (the name of this service)");
  if (!subject::is_valid_token(app)) throw ConfigError("app", "must be one token of letters, digits, '_' or '-'");

  const auto& cr = credentials;
  if (!cr.user.empty() && cr.password.empty()) throw ConfigError("credentials.password", "is required with a user");
  if (cr.user.empty() && !cr.password.empty()) throw ConfigError("credentials.user", "is required with a password");
  int methods = (cr.user.empty() ? 0 : 1) + (cr.token.empty() ? 0 : 1) + (cr.nkey_seed_file.empty() ? 0 : 1) +
                (cr.creds_file.empty() ? 0 : 1);
  if (methods > 1)
    throw ConfigError("credentials", "use only one of user/password, token, nkey_seed_file, creds_file");
  if (cr.nkey_seed_file.empty() != cr.nkey_public_key.empty())
    throw ConfigError(cr.nkey_seed_file.empty() ? "credentials.nkey_seed_file" : "credentials.nkey_public_key",
                      "nkey_public_key and nkey_seed_file go together");
  if (!cr.nkey_public_key.empty() && cr.nkey_public_key.front() != 'U')
    throw ConfigError("credentials.nkey_public_key", "must be a user public nkey (starts with U)");
  if (!cr.nkey_seed_file.empty() && !file_readable(cr.nkey_seed_file))
    throw ConfigError("credentials.nkey_seed_file", "cannot read " + cr.nkey_seed_file);
  if (!cr.creds_file.empty() && !file_readable(cr.creds_file))
    throw ConfigError("credentials.creds_file", "cannot read " + cr.creds_file);

  if (!tls.cert_file.empty() && tls.key_file.empty()) throw ConfigError("tls.key_file", "is required with tls.cert_file");
  if (tls.cert_file.empty() && !tls.key_file.empty()) throw ConfigError("tls.cert_file", "is required with tls.key_file");
  for (const auto& [field, path] : {std::pair{"tls.ca_file", tls.ca_file}, std::pair{"tls.cert_file", tls.cert_file},
                                    std::pair{"tls.key_file", tls.key_file}}) {
    if (!path.empty() && !file_readable(path)) throw ConfigError(field, "cannot read " + path);
  }

  check_positive("connection.connect_timeout_ms", connection.connect_timeout);
  check_positive("connection.reconnect_wait_ms", connection.reconnect_wait);
  if (connection.reconnect_jitter.count() < 0) throw ConfigError("connection.reconnect_jitter_ms", "must be >= 0");
  if (connection.max_reconnect_attempts < -1)
    throw ConfigError("connection.max_reconnect_attempts", "must be -1 (forever) or >= 0");
  if (connection.reconnect_buffer_bytes < 0) throw ConfigError("connection.reconnect_buffer_bytes", "must be >= 0");
  check_positive("connection.ping_interval_ms", connection.ping_interval);
  check_positive("connection.jetstream_timeout_ms", connection.jetstream_timeout);

  if (stream.replicas < 1 || stream.replicas > 5) throw ConfigError("stream.replicas", "must be between 1 and 5");
  if (stream.duplicate_window.count() < 0) throw ConfigError("stream.duplicate_window_ms", "must be >= 0");
  if (stream.max_age.count() < 0) throw ConfigError("stream.max_age_ms", "must be >= 0 (0: unlimited)");
  if (stream.max_age.count() > 0 && stream.duplicate_window > stream.max_age)
    throw ConfigError("stream.duplicate_window_ms", "must not exceed stream.max_age_ms");
  if (stream.max_bytes < -1 || stream.max_bytes == 0) throw ConfigError("stream.max_bytes", "must be -1 or > 0");
  if (stream.max_msgs < -1 || stream.max_msgs == 0) throw ConfigError("stream.max_msgs", "must be -1 or > 0");

  if (consumer.concurrency < 1 || consumer.concurrency > 10000)
    throw ConfigError("consumer.concurrency", "must be between 1 and 10000");
  if (consumer.max_attempts < 1) throw ConfigError("consumer.max_attempts", "must be >= 1");
  check_positive("consumer.ack_wait_ms", consumer.ack_wait);
  if (consumer.max_ack_pending < 1) throw ConfigError("consumer.max_ack_pending", "must be >= 1");
  for (size_t i = 0; i < consumer.backoff.size(); ++i) {
    check_positive("consumer.backoff_ms[" + std::to_string(i) + "]", consumer.backoff[i]);
  }
  check_positive("consumer.fetch_timeout_ms", consumer.fetch_timeout);
}

nlohmann::json Config::to_json() const {
  auto ms = [](Millis m) { return m.count(); };
  json backoff = json::array();
  for (auto b : consumer.backoff) backoff.push_back(b.count());
  return json{
      {"servers", servers},
      {"env", env},
      {"app", app},
      {"topology", to_string(topology)},
      {"credentials",
       {{"user", credentials.user},
        {"password", credentials.password},
        {"token", credentials.token},
        {"nkey_public_key", credentials.nkey_public_key},
        {"nkey_seed_file", credentials.nkey_seed_file},
        {"creds_file", credentials.creds_file}}},
      {"tls",
       {{"enabled", tls.enabled},
        {"ca_file", tls.ca_file},
        {"cert_file", tls.cert_file},
        {"key_file", tls.key_file},
        {"expected_hostname", tls.expected_hostname}}},
      {"connection",
       {{"name", connection.name},
        {"connect_timeout_ms", ms(connection.connect_timeout)},
        {"reconnect_wait_ms", ms(connection.reconnect_wait)},
        {"reconnect_jitter_ms", ms(connection.reconnect_jitter)},
        {"max_reconnect_attempts", connection.max_reconnect_attempts},
        {"reconnect_buffer_bytes", connection.reconnect_buffer_bytes},
        {"ping_interval_ms", ms(connection.ping_interval)},
        {"retry_on_failed_connect", connection.retry_on_failed_connect},
        {"jetstream_timeout_ms", ms(connection.jetstream_timeout)}}},
      {"stream",
       {{"replicas", stream.replicas},
        {"memory_storage", stream.memory_storage},
        {"duplicate_window_ms", ms(stream.duplicate_window)},
        {"max_age_ms", ms(stream.max_age)},
        {"max_bytes", stream.max_bytes},
        {"max_msgs", stream.max_msgs}}},
      {"consumer",
       {{"concurrency", consumer.concurrency},
        {"max_attempts", consumer.max_attempts},
        {"ack_wait_ms", ms(consumer.ack_wait)},
        {"max_ack_pending", consumer.max_ack_pending},
        {"backoff_ms", backoff},
        {"fetch_timeout_ms", ms(consumer.fetch_timeout)}}},
  };
}

nlohmann::json Config::redacted_json() const {
  auto j = to_json();
  for (auto& s : j["servers"]) s = redact_url(s.get<std::string>());
  for (const char* secret : {"password", "token"}) {
    if (!j["credentials"][secret].get<std::string>().empty()) j["credentials"][secret] = kRedacted;
  }
  return j;
}

std::string Config::subject(std::string_view topic) const { return subject::build(env, app, topic); }
std::string Config::events_stream_name() const {
  // NatsPubsub's stream is one per environment, shared by every app (its config.streamName).
  return topology == TopologyMode::natspubsub ? env + "-events-stream" : env + "-" + app + "-events";
}
std::string Config::dlq_stream_name() const { return env + "-" + app + "-dlq"; }
std::string Config::client_name() const { return connection.name.empty() ? env + "-" + app : connection.name; }

}  // namespace natspubsub
