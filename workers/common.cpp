#include "common.hpp"

#include <atomic>
#include <cctype>
#include <memory>
#include <string_view>

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <natspubsub/features.hpp>
#include <natspubsub/log.hpp>

namespace natspubsub::workers {

void NatsFlags::add_to(CLI::App& cli) {
  cli.add_option("--config", config_file, "JSON configuration file (see README)")->envname("NATSPUBSUB_CONFIG");
  cli.add_option("--nats", servers, "NATS server URL(s), comma-separated")->envname("NATS_URL");
  cli.add_option("--env", env, "environment (first subject token)")->envname("NATSPUBSUB_ENV");
  cli.add_option("--app", app, "application name")->envname("NATSPUBSUB_APP");
  cli.add_option("--topology", topology, "standard, or natspubsub: NatsPubsub's stream and durable names (README)")
      ->envname("NATSPUBSUB_TOPOLOGY");
  cli.add_option("--user", user, "NATS user")->envname("NATSPUBSUB_USER");
  cli.add_option("--password", password, "NATS password (prefer the environment variable)")->envname("NATSPUBSUB_PASSWORD");
  cli.add_option("--token", token, "NATS token (prefer the environment variable)")->envname("NATSPUBSUB_TOKEN");
  cli.add_option("--creds", creds_file, "NATS .creds file")->envname("NATSPUBSUB_CREDS_FILE");
  cli.add_option("--nkey-seed", nkey_seed_file, "file with the user's nkey seed")->envname("NATSPUBSUB_NKEY_SEED_FILE");
  cli.add_option("--nkey", nkey_public_key, "the user's public nkey (U...)")->envname("NATSPUBSUB_NKEY_PUBLIC_KEY");
  cli.add_option("--tls-ca", tls_ca, "CA certificate file")->envname("NATSPUBSUB_TLS_CA_FILE");
  cli.add_option("--tls-cert", tls_cert, "client certificate file")->envname("NATSPUBSUB_TLS_CERT_FILE");
  cli.add_option("--tls-key", tls_key, "client key file")->envname("NATSPUBSUB_TLS_KEY_FILE");
}

Config NatsFlags::build() const {
  Config c = config_file.empty() ? Config::development("") : Config::from_json_file(config_file);
  c = Config::from_env(c);
  if (!servers.empty()) {
    c.servers.clear();
    std::string item;
    for (char ch : servers + ",") {
      if (ch == ',') {
        if (!item.empty()) c.servers.push_back(item);
        item.clear();
      } else if (ch != ' ') {
        item += ch;
      }
    }
  }
  if (!env.empty()) c.env = env;
  if (!app.empty()) c.app = app;
  if (!topology.empty()) c.topology = parse_topology_mode(topology, "--topology");
  auto set = [](std::string& field, const std::string& value) {
    if (!value.empty()) field = value;
  };
  set(c.credentials.user, user);
  set(c.credentials.password, password);
  set(c.credentials.token, token);
  set(c.credentials.creds_file, creds_file);
  set(c.credentials.nkey_seed_file, nkey_seed_file);
  set(c.credentials.nkey_public_key, nkey_public_key);
  set(c.tls.ca_file, tls_ca);
  set(c.tls.cert_file, tls_cert);
  set(c.tls.key_file, tls_key);
  // A tool should notice a dead server quickly at start; the library default is gentler.
  c.connection.connect_timeout = Millis{2000};
  c.validate();
  return c;
}

namespace {

// %* in a pattern: the message, escaped for a JSON string (quotes, backslashes, control bytes).
class JsonEscapedMessage : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&, spdlog::memory_buf_t& dest) override {
    for (char c : std::string_view(msg.payload.data(), msg.payload.size())) {
      switch (c) {
        case '"': dest.append(std::string_view("\\\"")); break;
        case '\\': dest.append(std::string_view("\\\\")); break;
        case '\n': dest.append(std::string_view("\\n")); break;
        case '\r': dest.append(std::string_view("\\r")); break;
        case '\t': dest.append(std::string_view("\\t")); break;
        default:
          if (static_cast<unsigned char>(c) < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof(buf), "\\u%04x", static_cast<unsigned>(static_cast<unsigned char>(c)));
            dest.append(std::string_view(buf));
          } else {
            dest.push_back(c);
          }
      }
    }
  }
  [[nodiscard]] std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<JsonEscapedMessage>();
  }
};

// The fields of set_log_fields and ScopedLogFields, each kept serialised as `,"k":v,...` (the
// object's dump without its braces), so formatting a line copies text and parses nothing.
std::atomic<std::shared_ptr<const std::string>> process_fields{std::make_shared<const std::string>()};
thread_local std::string line_fields;

std::string as_members(const nlohmann::json& fields) {
  if (!fields.is_object() || fields.empty()) return {};
  auto text = fields.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  return "," + text.substr(1, text.size() - 2);
}

// %& in a pattern: the process's and the line's fields, as more members of the JSON object.
class JsonFields : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg&, const std::tm&, spdlog::memory_buf_t& dest) override {
    const auto fields = process_fields.load();
    dest.append(std::string_view(*fields));
    dest.append(std::string_view(line_fields));
  }
  [[nodiscard]] std::unique_ptr<custom_flag_formatter> clone() const override { return std::make_unique<JsonFields>(); }
};

std::unique_ptr<spdlog::formatter> json_formatter() {
  auto f = std::make_unique<spdlog::pattern_formatter>(spdlog::pattern_time_type::utc);
  f->add_flag<JsonEscapedMessage>('*').add_flag<JsonFields>('&').set_pattern(
      R"({"time":"%Y-%m-%dT%H:%M:%S.%eZ","level":"%l","logger":"%n","msg":"%*"%&})");
  return f;
}

}  // namespace

void setup_logging(const std::string& format, const std::string& tool_name) {
  auto sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
  auto lib = std::make_shared<spdlog::logger>("natspubsub", sink);
  auto tool = std::make_shared<spdlog::logger>(tool_name, sink);
  if (format == "json") {
    // One JSON object per line; spdlog in Debian 12 has no JSON formatter, so the message is
    // escaped by our own pattern flag.
    lib->set_formatter(json_formatter());
    tool->set_formatter(json_formatter());
  } else {
    lib->set_pattern("%Y-%m-%dT%H:%M:%S.%e%z %^%l%$ [%n] %v");
    tool->set_pattern("%Y-%m-%dT%H:%M:%S.%e%z %^%l%$ [%n] %v");
  }
  natspubsub::set_logger(lib);
  spdlog::set_default_logger(tool);
}

void set_log_fields(const nlohmann::json& fields) {
  process_fields.store(std::make_shared<const std::string>(as_members(fields)));
}

ScopedLogFields::ScopedLogFields(const nlohmann::json& fields) : previous_(std::move(line_fields)) {
  line_fields = previous_ + as_members(fields);
}

ScopedLogFields::~ScopedLogFields() { line_fields = std::move(previous_); }

bool refuse_postgres_without_support(const std::string& database_url, const std::string& tool_name) {
#if NATSPUBSUB_HAS_POSTGRES
  (void)database_url;
  (void)tool_name;
  return false;
#else
  auto lower = database_url.substr(0, 13);
  for (auto& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (!lower.starts_with("postgres://") && !lower.starts_with("postgresql://")) return false;
  spdlog::error("{}: this build has no PostgreSQL support (built with NATSPUBSUB_WITH_POSTGRES=OFF); "
                "give a sqlite:// database URL",
                tool_name);
  return true;
#endif
}

}  // namespace natspubsub::workers
