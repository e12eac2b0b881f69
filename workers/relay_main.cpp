// natspubsub-relay: moves committed outbox rows into JetStream. See README "Operations".
#include <algorithm>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <string_view>
#include <thread>

#include <nats/nats.h>
#include <spdlog/spdlog.h>

#include <natspubsub/connection.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/metrics.hpp>
#include <natspubsub/outbox.hpp>
#include <natspubsub/outbox_relay.hpp>
#include <natspubsub/service.hpp>
#include <natspubsub/store/database.hpp>
#include <natspubsub/store/migrations.hpp>
#include <natspubsub/topology.hpp>
#include <natspubsub/version.hpp>

#include "common.hpp"
#include "stop_signals.hpp"
#include "metrics_server.hpp"
#include "relay_metrics.hpp"

using namespace natspubsub;
using namespace natspubsub::workers;

namespace {

// The stream's duplicate window; nullopt when it cannot be read (the check is then skipped).
std::optional<Millis> duplicate_window(Connection& nats, const std::string& stream) {
  jsStreamInfo* si = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  if (js_GetStreamInfo(&si, nats.jetstream(), stream.c_str(), nullptr, &jerr) != NATS_OK || si == nullptr)
    return std::nullopt;
  const int64_t ns = si->Config != nullptr ? si->Config->Duplicates : 0;
  jsStreamInfo_Destroy(si);
  if (ns <= 0) return std::nullopt;
  return Millis{ns / 1000000};
}

// --no-migrate promises the schema is there: name the first missing migration instead of failing
// every cycle on a missing table. Returns "" when every built-in migration is applied.
std::string first_missing_migration(store::Database& db) {
  auto applied = store::applied_migrations(db);
  for (const auto& m : store::migrations(db.backend())) {
    if (std::find(applied.begin(), applied.end(), m.version) == applied.end()) return std::string(m.name);
  }
  return {};
}

// Every `interval`: what the relay did since the last line, and what waits. Off when interval is 0.
void log_progress(std::stop_token stop, std::chrono::seconds interval, const OutboxRelay& relay,
                  const std::function<OutboxStats()>& outbox) {
  std::mutex m;
  std::condition_variable_any cv;
  uint64_t last_published = relay.stats().published;
  for (;;) {
    {
      std::unique_lock lock(m);
      cv.wait_for(lock, stop, interval, [] { return false; });
    }
    if (stop.stop_requested()) return;
    auto s = relay.stats();
    const nlohmann::json counts = {{"published", s.published - last_published},
                                   {"published_total", s.published},
                                   {"interval_s", interval.count()}};
    try {
      auto o = outbox();
      const double oldest_s = o.oldest_unsent_age ? static_cast<double>(o.oldest_unsent_age->count()) / 1000.0 : 0.0;
      auto fields = counts;
      fields.update({{"pending", o.pending}, {"oldest_pending_s", oldest_s}, {"failed", o.failed}});
      log_info(fields, "progress: {} published in the last {} s ({} since start), {} pending, oldest pending {:.1f} s, {} failed",
               s.published - last_published, interval.count(), s.published, o.pending, oldest_s, o.failed);
    } catch (const std::exception& e) {
      log_info(counts, "progress: {} published in the last {} s ({} since start); outbox figures unavailable: {}",
               s.published - last_published, interval.count(), s.published, e.what());
    }
    last_published = s.published;
  }
}


// --once: relays the rows that were in the outbox at start (ids up to the largest one then), so
// it ends while producers keep inserting. While NATS is disconnected or a stream does not answer
// (rows released without an attempt) it waits and tries again, for at most `nats_wait` without
// progress. Logs what was done, what remains and when the next pending row is due. Returns
// false when it gave up waiting for NATS.
bool drain_once(OutboxRelay& relay, const std::function<OutboxStats()>& outbox_stats, std::stop_token stop,
                std::chrono::seconds nats_wait) {
  const auto up_to_id = outbox_stats().max_id;
  std::size_t handled = 0;
  auto waiting_since = std::chrono::steady_clock::now();
  uint64_t published = 0;
  bool gave_up = false;
  std::mutex m;
  std::condition_variable_any cv;
  while (!stop.stop_requested()) {
    handled += relay.drain(stop, up_to_id);
    if (!relay.nats_unavailable()) break;
    const auto now = std::chrono::steady_clock::now();
    if (const auto p = relay.stats().published; p != published) {
      published = p;
      waiting_since = now;
    }
    if (now - waiting_since >= nats_wait) {
      gave_up = true;
      break;
    }
    std::unique_lock lock(m);
    cv.wait_for(lock, stop, std::chrono::milliseconds(250), [] { return false; });
  }
  const auto s = relay.stats();
  const auto left = outbox_stats();
  std::string next = "none pending";
  if (left.next_due_in) {
    next = left.next_due_in->count() == 0 ? "next due now"
                                          : fmt::format("next due in {:.1f} s", left.next_due_in->count() / 1000.0);
  }
  nlohmann::json fields = {{"rows", handled},          {"published", s.published}, {"duplicates", s.duplicates},
                            {"rescheduled", s.retried},  {"failed", s.failed},       {"released", s.released},
                            {"batches", s.batches},      {"left_pending", left.pending},
                            {"left_publishing", left.publishing}, {"left_failed", left.failed}};
  if (left.next_due_in) fields["next_due_s"] = left.next_due_in->count() / 1000.0;
  log_info(fields,
           "relayed {} row(s): {} published ({} duplicates), {} rescheduled, {} failed; left in the outbox: {} "
           "pending ({}), {} publishing, {} failed",
           handled, s.published, s.duplicates, s.retried, s.failed, left.pending, next, left.publishing, left.failed);
  if (gave_up)
    spdlog::error("NATS was unavailable for {} s (disconnected or no stream answering): {} row(s) still pending, "
                  "exiting with code 5",
                  nats_wait.count(), left.pending + left.publishing);
  return !gave_up;
}

}  // namespace

int main(int argc, char** argv) {
  // First, before any thread exists: SIGTERM and SIGINT are taken by a thread of ours, never by a
  // signal handler. During start-up they end the process with exit 0 at once; once the relay runs
  // they stop it after the batch in flight.
  StopSignals signals;
  CLI::App cli{"natspubsub-relay: publishes committed outbox rows to NATS JetStream", "natspubsub-relay"};
  NatsFlags nats_flags;
  nats_flags.add_to(cli);
  std::string database_url;
  RelayOptions options;
  int64_t poll_ms = options.poll_interval.count();
  int64_t lease_ms = options.lease.count();
  bool once = false;
  bool no_migrate = false;
  bool delete_sent = false;
  bool lease_claims = false;
  std::string log_format = "text";
  std::string metrics_addr;
  cli.add_option("--database", database_url,
                 "sqlite:///path.db, sqlite://relative.db or postgresql://... (also DATABASE_URL)")
      ->envname("NATSPUBSUB_DATABASE_URL");
  cli.add_option("--batch-size", options.batch_size, "rows claimed and published per cycle")
      ->envname("NATSPUBSUB_RELAY_BATCH_SIZE")
      ->check(CLI::Range(1, 100000))
      ->capture_default_str();
  cli.add_option("--poll-interval", poll_ms, "milliseconds to wait when nothing is pending")
      ->envname("NATSPUBSUB_RELAY_POLL_INTERVAL_MS")
      ->check(CLI::Range(1, 3600000))
      ->capture_default_str();
  cli.add_option("--max-attempts", options.max_attempts, "failed publishes before a row is marked failed")
      ->envname("NATSPUBSUB_RELAY_MAX_ATTEMPTS")
      ->check(CLI::Range(1, 1000000))
      ->capture_default_str();
  cli.add_option("--lease", lease_ms, "milliseconds a claimed row stays ours before another relay may take it")
      ->envname("NATSPUBSUB_RELAY_LEASE_MS")
      ->capture_default_str();
  int64_t ack_timeout_ms = options.ack_timeout.count();
  cli.add_option("--ack-timeout", ack_timeout_ms, "milliseconds to wait for a PubAck (must be below --lease)")
      ->envname("NATSPUBSUB_RELAY_ACK_TIMEOUT_MS")
      ->check(CLI::Range(1, 3600000))
      ->capture_default_str();
  cli.add_option("--relay-id", options.relay_id, "name of this relay in the outbox's locked_by column")
      ->envname("NATSPUBSUB_RELAY_ID");
  cli.add_flag("--delete-sent", delete_sent, "delete rows once published instead of marking them sent")
      ->envname("NATSPUBSUB_RELAY_DELETE_SENT");
  cli.add_flag("--lease-claims", lease_claims,
               "claim rows with a lease (status publishing): on PostgreSQL instead of holding them by row "
               "locks (needed while relays without held claims, older builds, run on the same database); on "
               "SQLite instead of read claims, so that several relays may share the file")
      ->envname("NATSPUBSUB_RELAY_LEASE_CLAIMS");
  cli.add_flag("--once", once,
               "publish the rows in the outbox at start, then exit 0 (exit 5 if NATS stays unavailable for "
               "--nats-wait seconds)");
  int64_t nats_wait_s = 30;
  cli.add_option("--nats-wait", nats_wait_s,
                 "with --once: seconds to wait for NATS (disconnected or a stream not answering) before giving up")
      ->envname("NATSPUBSUB_RELAY_NATS_WAIT_S")
      ->check(CLI::Range(0, 86400))
      ->capture_default_str();
  cli.add_flag("--no-migrate", no_migrate, "do not apply pending migrations at start")->envname("NATSPUBSUB_NO_MIGRATE");
  cli.add_option("--log-format", log_format, "text or json")
      ->envname("NATSPUBSUB_LOG_FORMAT")
      ->check(CLI::IsMember({"text", "json"}))
      ->capture_default_str();
  cli.add_option("--metrics-addr", metrics_addr,
                 ":PORT (all interfaces), HOST:PORT or [IPv6]:PORT serving /metrics, /livez, /readyz, /healthz")
      ->envname("NATSPUBSUB_METRICS_ADDR");
  int64_t progress_s = 30;
  cli.add_option("--progress-interval", progress_s, "seconds between progress lines (0: none)")
      ->envname("NATSPUBSUB_RELAY_PROGRESS_INTERVAL_S")
      ->check(CLI::Range(int64_t{0}, int64_t{86400}))
      ->capture_default_str();
  cli.set_version_flag("--version", std::string("natspubsub-relay ") + std::string(natspubsub::version()));
  try {
    cli.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = cli.exit(e);
    return rc == 0 ? kExitOk : kExitUsage;
  }
  setup_logging(log_format, "natspubsub-relay");
  if (database_url.empty()) {
    // The convention of Heroku, Rails and most PaaS: ours wins when both are set.
    if (const char* v = std::getenv("DATABASE_URL"); v != nullptr) database_url = v;
  }
  if (database_url.empty()) {
    spdlog::error("--database is required (or NATSPUBSUB_DATABASE_URL, or DATABASE_URL)");
    return kExitUsage;
  }
  if (refuse_postgres_without_support(database_url, "natspubsub-relay")) return kExitUsage;
  std::string listening_ports;
  if (!metrics_addr.empty()) {
    try {
      listening_ports = parse_listen_address(metrics_addr);
    } catch (const std::invalid_argument& e) {
      spdlog::error("{}", e.what());
      return kExitUsage;
    }
  }
  options.poll_interval = Millis{poll_ms};
  options.lease = Millis{lease_ms};
  options.ack_timeout = Millis{ack_timeout_ms};
  options.delete_sent = delete_sent;
  options.hold_claims = !lease_claims;

  Config config;
  try {
    config = nats_flags.build();
  } catch (const ConfigError& e) {
    spdlog::error("{}", e.what());
    return kExitConfig;
  } catch (const Error& e) {
    spdlog::error("{}", e.what());
    return kExitConfig;
  }

  // JSON log lines from here on name the application (and, once the relay exists, the relay).
  set_log_fields({{"app", config.app}, {"env", config.env}});

  std::unique_ptr<store::Database> db;
  try {
    // Only a run that migrates may create a SQLite file: with --no-migrate a mistyped path is refused.
    db = store::open_database(database_url, {.create_sqlite_file = !no_migrate});
    if (!no_migrate) {
      auto applied = store::migrate(*db);
      if (!applied.empty()) spdlog::info("applied {} migration(s) to {}", applied.size(), db->description());
    } else if (auto missing = first_missing_migration(*db); !missing.empty()) {
      spdlog::error("database {}: migration {} is not applied (run once without --no-migrate, or apply "
                    "migrations/{}/{} by hand)",
                    db->description(), missing, db->backend() == store::Backend::sqlite ? "sqlite" : "postgres",
                    missing);
      return kExitDatabase;
    }
  } catch (const std::exception& e) {
    const bool missing_file = no_migrate && std::string_view(e.what()).find("does not exist") != std::string_view::npos;
    spdlog::error("database: {}{}", e.what(), missing_file ? " (with --no-migrate the file is not created)" : "");
    if (const auto* db_error = dynamic_cast<const store::DatabaseError*>(&e); db_error && !db_error->query().empty()) {
      spdlog::debug("database: the failing statement: {}", db_error->query());
    }
    return kExitDatabase;
  }

  std::optional<Connection> nats;
  try {
    nats.emplace(config);
    const auto events = Topology(*nats).ensure_events_stream();
    // A row re-claimed after its lease ended is published again; JetStream drops the copy only
    // inside the stream's duplicate window, so the lease must end well inside it.
    if (const auto window = duplicate_window(*nats, events.stream); window && options.lease >= *window)
      throw ConfigError("relay.lease", "--lease " + std::to_string(options.lease.count()) +
                                           " ms must be below the duplicate window of stream " + events.stream + " (" +
                                           std::to_string(window->count()) +
                                           " ms): a row published again after its lease would be stored twice");
  } catch (const ConfigError& e) {
    spdlog::error("{}", e.what());
    return kExitConfig;
  } catch (const std::exception& e) {
    spdlog::error("NATS: {}", e.what());
    return kExitNats;
  }

  std::unique_ptr<OutboxRelay> relay_ptr;
  try {
    relay_ptr = std::make_unique<OutboxRelay>(*nats, *db, options);
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    return kExitConfig;
  }
  auto& relay = *relay_ptr;
  set_log_fields({{"relay_id", relay.relay_id()}, {"app", config.app}, {"env", config.env}});
  try {
    // One extra database handle for the health check and the metrics endpoint: the relay's own
    // belongs to its thread.
    auto side_db = store::open_database(database_url, {.create_sqlite_file = false});
    auto side_store = std::shared_ptr<OutboxStore>(make_outbox_store(*side_db));
    auto side_mutex = std::make_shared<std::mutex>();
    std::function<OutboxStats()> outbox_stats = [side_store, side_mutex] {
      std::lock_guard lock(*side_mutex);
      return side_store->stats();
    };
    Health health(*nats);
    health.add_check("database", [outbox_stats] { (void)outbox_stats(); });

    // NATS service discovery: `$SRV.PING|INFO|STATS` list this relay and its figures.
    Service service(*nats, {.name = "natspubsub-relay", .version = std::string(natspubsub::version()),
                            .description = "outbox relay of " + config.app,
                            .metadata = {{"app", config.app}, {"env", config.env}, {"database", db->description()}}});
    service.add_endpoints([&relay, &config] {
      auto s = relay.stats();
      ServiceEndpoint e;
      e.name = "outbox";
      e.subject = config.env + "." + config.app + ".>";
      e.num_requests = s.published;
      e.num_errors = s.errors + s.failed;
      e.processing_time = std::chrono::nanoseconds(static_cast<int64_t>(s.publish_latency.sum_seconds * 1e9));
      e.data = {{"published", s.published}, {"duplicates", s.duplicates}, {"retried", s.retried},
                {"failed", s.failed}, {"released", s.released}, {"batches", s.batches}};
      return std::vector<ServiceEndpoint>{e};
    });

    std::unique_ptr<MetricsServer> metrics;
    if (!metrics_addr.empty()) {
      metrics = std::make_unique<MetricsServer>(listening_ports, [&health] { return health.readiness(); });
      metrics->add_collectable(std::make_shared<RelayMetrics>(RelayMetrics::Sources{
          .relay = [&relay] { return relay.stats(); },
          .outbox = outbox_stats,
          .nats_connected = [&nats] { return nats->connected(); }}));
      metrics->add_collectable(process_metrics());
      spdlog::info("metrics on {} (port {}): /metrics /livez /readyz /healthz", metrics_addr, metrics->ports().front());
    }
    std::jthread progress;
    if (!once && progress_s > 0) {
      progress = std::jthread(log_progress, std::chrono::seconds(progress_s), std::cref(relay), outbox_stats);
    }

    signals.set_running();
    if (once) {
      if (!drain_once(relay, outbox_stats, signals.token(), std::chrono::seconds(nats_wait_s))) return kExitNats;
    } else {
      relay.run(signals.token());
    }
    nats->flush();
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    return kExitFailure;
  }
  return kExitOk;
}
