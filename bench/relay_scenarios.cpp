// The outbox relay draining a backlog of pending rows (SQLite and PostgreSQL), against raw
// async publishing of the same payloads with the same Nats-Msg-Ids: the relay's cost over the
// network work is the claim and mark statements around each batch.
#include <natspubsub/connection.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/outbox.hpp>
#include <natspubsub/outbox_relay.hpp>
#include <natspubsub/store/migrations.hpp>
#include <natspubsub/store/postgres.hpp>
#include <natspubsub/store/sqlite.hpp>

#include <pqxx/pqxx>

#include <csignal>
#include <cstdio>
#include <map>
#include <set>
#include <thread>

#include "bench.hpp"
#include "support/nats_helpers.hpp"
#include "support/process.hpp"
#include "raw_nats.hpp"
#include "setup.hpp"

namespace natspubsub::bench {
namespace {

struct Event {
  std::string event_id;
  std::string payload;  // the encoded envelope, as enqueue stores it
};

std::vector<Event> make_events(int n) {
  const auto message = make_message(128);
  std::vector<Event> events;
  events.reserve(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) {
    auto e = Envelope::make("relay", "bench", message);
    events.push_back({e.event_id, e.encode()});
  }
  return events;
}

// Pending rows. SQLite: enqueue(), as an application writes them, in one transaction for the
// whole backlog. PostgreSQL: COPY, because 100,000 enqueue round trips take longer than the drain
// itself; a row with event_id, subject, payload and headers is a valid pending event either way.
// `keys` > 0: event i gets partition key "key-(i % keys)", so the keys' runs interleave as many
// producers would write them.
void fill_outbox(store::Database& db, const std::vector<Event>& events, const std::string& subject, int keys = 0) {
  const std::string headers = R"({"topic":"relay"})";
  auto key_of = [&](std::size_t i) -> std::optional<std::string> {
    if (keys <= 0) return std::nullopt;
    return "key-" + std::to_string(i % static_cast<std::size_t>(keys));
  };
  if (auto* sqlite = dynamic_cast<store::SqliteDatabase*>(&db)) {
    auto tx = sqlite->begin();
    for (std::size_t i = 0; i < events.size(); ++i)
      enqueue(tx, OutboxMessage{events[i].event_id, subject, events[i].payload, nlohmann::json::parse(headers), key_of(i)});
    tx.commit();
    return;
  }
  auto& pg = dynamic_cast<store::PostgresDatabase&>(db);
  pqxx::work tx(pg.connection());
  pqxx::stream_to copy(tx, "natspubsub_outbox",
                       std::vector<std::string>{"event_id", "subject", "payload", "headers", "partition_key"});
  for (std::size_t i = 0; i < events.size(); ++i)
    copy << std::make_tuple(events[i].event_id, subject, events[i].payload, headers, key_of(i));
  copy.complete();
  tx.commit();
  // Plan the claims against real statistics, as autovacuum would after a burst of this size.
  pqxx::nontransaction(pg.connection()).exec("ANALYZE natspubsub_outbox");
}

struct Backend {
  std::string name;  // "sqlite" | "postgres"
  std::function<std::unique_ptr<store::Database>(int run)> open;
};

Result run_relay(Context& ctx, const Backend& backend, double target) {
  const auto& s = ctx.settings();
  auto load = load_average();
  const int rows = s.relay_rows;
  Connection nats(bench_config(ctx.nats_url()));
  const auto stream = ensure_bench_stream(nats);
  RawNats raw(ctx.nats_url(), s.publish_window);
  raw.purge_stream(stream);
  const auto subject = bench_subject("relay_" + backend.name);
  const auto raw_subject = bench_subject("raw_relay_" + backend.name);
  std::vector<double> fill_seconds;
  std::vector<double> lib_cpu, raw_cpu;  // this process only: PostgreSQL's own CPU is not in it
  int run = 0;

  auto library = [&](int n, bool hold_claims = true, bool delete_sent = false) {
    auto db = backend.open(++run);
    store::migrate(*db);
    auto events = make_events(n);
    auto t_fill = std::chrono::steady_clock::now();
    fill_outbox(*db, events, subject);
    fill_seconds.push_back(elapsed_seconds(t_fill));
    RelayOptions o;
    o.relay_id = "bench-relay";
    o.publish_window = s.publish_window;
    o.hold_claims = hold_claims;
    o.delete_sent = delete_sent;
    OutboxRelay relay(nats, *db, o);
    const double c0 = process_cpu_seconds();
    auto t0 = std::chrono::steady_clock::now();
    auto handled = relay.drain();
    const double rate = n / elapsed_seconds(t0);
    if (hold_claims && !delete_sent) lib_cpu.push_back((process_cpu_seconds() - c0) * 1e6 / n);
    auto st = relay.stats();
    if (handled != static_cast<std::size_t>(n) || st.published != static_cast<uint64_t>(n))
      throw std::runtime_error("relay " + backend.name + " published " + std::to_string(st.published) + " of " +
                               std::to_string(n));
    return rate;
  };
  auto baseline = [&](int n) {
    auto events = make_events(n);
    const double c0 = process_cpu_seconds();
    auto t0 = std::chrono::steady_clock::now();
    for (const auto& e : events) raw.publish_async(raw_subject.c_str(), e.payload, e.event_id.c_str());
    raw.complete_async();
    const double rate = n / elapsed_seconds(t0);
    raw_cpu.push_back((process_cpu_seconds() - c0) * 1e6 / n);
    return rate;
  };
  auto [lib_runs, raw_runs] = interleave(
      s.slow_repetitions, [&] { return library(rows); }, [&] { return baseline(rows); },
      [&] {
        library(std::max(500, rows / 20));
        baseline(std::max(500, rows / 20));
        fill_seconds.clear();
        lib_cpu.clear();
        raw_cpu.clear();
      });
  // The same drain with lease claims (two writes per row: `publishing`, then sent), not
  // interleaved, for its ratio to the baseline median above.
  std::vector<double> lease_runs;
  for (int i = 0; i < s.slow_repetitions; ++i) lease_runs.push_back(library(rows, false));
  // The same drain with delete_sent (--delete-sent: acknowledged rows deleted, not kept for
  // cleanup_after): on PostgreSQL a DELETE sets one field of each row, where marking it sent
  // writes a new row version and three index entries (about 2 ms against 10 ms per 500 rows).
  std::vector<double> delete_runs;
  for (int i = 0; i < s.slow_repetitions; ++i) delete_runs.push_back(library(rows, true, true));
  raw.purge_stream(stream);

  Result r;
  r.scenario = "relay_" + backend.name;
  r.unit = "msgs/s";
  r.description = "OutboxRelay::drain of " + std::to_string(rows) + " pending rows (" + backend.name +
                  ", batch 500, window " + std::to_string(s.publish_window) +
                  (backend.name == "postgres" ? ", held claims" : ", read claims under the relay lock") +
                  ", mark sent) vs js_PublishMsgAsync of the same payloads";
  r.library_runs = lib_runs;
  r.baseline_runs = raw_runs;
  r.target = {Target::Kind::ratio_at_least, target};
  r.load_avg = load;
  r.extra = {{"count", rows}, {"body_bytes", make_events(1).front().payload.size()},
             {"fill_seconds_median", median(fill_seconds)},
             {"library_cpu_us_per_msg", median(lib_cpu)},
             {"baseline_cpu_us_per_msg", median(raw_cpu)}};
  r.extra["library_delete_sent"] = median(delete_runs);
  r.extra["ratio_delete_sent"] = median(delete_runs) / median(raw_runs);
  if (!lease_runs.empty()) {
    r.extra["library_lease_claims"] = median(lease_runs);
    r.extra["ratio_lease_claims"] = median(lease_runs) / median(raw_runs);
  }
  return r;
}

std::vector<Result> run_relay_sqlite(Context& ctx) {
  Backend b{"sqlite", [&ctx](int run) -> std::unique_ptr<store::Database> {
              return std::make_unique<store::SqliteDatabase>(ctx.scratch_path("relay") + "/outbox-" +
                                                            std::to_string(run) + ".db");
            }};
  return {run_relay(ctx, b, 0.6)};
}

std::vector<Result> run_relay_postgres(Context& ctx) {
  Backend b{"postgres", [&ctx](int run) -> std::unique_ptr<store::Database> {
              return std::make_unique<store::PostgresDatabase>(
                  ctx.postgres().create_database("relay_" + std::to_string(run)));
            }};
  return {run_relay(ctx, b, 0.5)};
}

// Hot keys: the same drain with every row under one of 100 partition keys (1,000 rows a key for
// 100,000 rows), against the unkeyed drain in the same run. Target: at least half the unkeyed rate.
std::vector<Result> run_relay_postgres_keys(Context& ctx) {
  const auto& s = ctx.settings();
  auto load = load_average();
  const int rows = s.relay_rows;
  constexpr int kKeys = 100;
  Connection nats(bench_config(ctx.nats_url()));
  const auto stream = ensure_bench_stream(nats);
  RawNats raw(ctx.nats_url(), s.publish_window);
  raw.purge_stream(stream);
  const auto subject = bench_subject("relay_keys");
  int run = 0;
  auto drain = [&](int n, int keys) {
    store::PostgresDatabase db(ctx.postgres().create_database("relay_keys_" + std::to_string(++run)));
    store::migrate(db);
    fill_outbox(db, make_events(n), subject, keys);
    RelayOptions o;
    o.relay_id = "bench-relay";
    o.publish_window = s.publish_window;
    OutboxRelay relay(nats, db, o);
    auto t0 = std::chrono::steady_clock::now();
    relay.drain();
    const double rate = n / elapsed_seconds(t0);
    if (relay.stats().published != static_cast<uint64_t>(n))
      throw std::runtime_error("relay with keys published " + std::to_string(relay.stats().published) + " of " +
                               std::to_string(n));
    raw.purge_stream(stream);
    return rate;
  };
  auto [keyed, unkeyed] = interleave(
      s.slow_repetitions, [&] { return drain(rows, kKeys); }, [&] { return drain(rows, 0); },
      [&] { drain(std::max(500, rows / 20), kKeys); });
  Result r;
  r.scenario = "relay_postgres_keys";
  r.unit = "msgs/s";
  r.description = "OutboxRelay::drain of " + std::to_string(rows) + " rows under " + std::to_string(kKeys) +
                  " partition keys vs the same drain without keys (PostgreSQL)";
  r.library_runs = keyed;
  r.baseline_runs = unkeyed;
  r.target = {Target::Kind::ratio_at_least, 0.5};
  r.load_avg = load;
  r.extra = {{"count", rows}, {"keys", kKeys}};
  return {r};
}

// How users scale past one relay: 1, 2 and 4 natspubsub-relay processes draining one PostgreSQL
// outbox of 200,000 rows over 100 keys. Timed from the relays' start to the last row sent (read
// from the table every 50 ms); afterwards the stream is read back and each key's events must be
// there once each, in enqueue order. Library side: two relays; baseline: one relay (target:
// two relays faster than one). The four-relay figure is in `extra`.
std::vector<Result> run_relay_postgres_scaling(Context& ctx) {
  const auto& s = ctx.settings();
  auto load = load_average();
  const int rows = s.quick ? 2000 : 2 * s.relay_rows;
  constexpr int kKeys = 100;
  Connection nats(bench_config(ctx.nats_url()));
  const auto stream = ensure_bench_stream(nats);
  RawNats raw(ctx.nats_url(), s.publish_window);
  testing::RawNats reader(ctx.nats_url());
  const auto subject = bench_subject("relay_scaling");
  int run = 0;
  std::map<int, std::vector<double>> rates;

  auto drain_with = [&](int relays) {
    raw.purge_stream(stream);
    const auto url = ctx.postgres().create_database("relay_scaling_" + std::to_string(++run));
    auto events = make_events(rows);
    std::map<std::string, std::pair<int, int>> position;  // event id -> (key, index within key)
    for (int i = 0; i < rows; ++i) position[events[static_cast<std::size_t>(i)].event_id] = {i % kKeys, i / kKeys};
    {
      store::PostgresDatabase db(url);
      store::migrate(db);
      fill_outbox(db, events, subject, kKeys);
    }
    store::PostgresDatabase db(url);
    auto unsent = [&] {
      pqxx::nontransaction q(db.connection());
      // Cheap enough to ask every 50 ms (a count of the whole table would compete with the relays).
      return q.exec("SELECT count(*) FROM (SELECT 1 FROM natspubsub_outbox WHERE status IN ('pending', 'publishing') "
                    "LIMIT 1) AS any_left")[0][0].as<int64_t>();
    };
    std::vector<std::unique_ptr<testing::detail::ChildProcess>> children;
    const auto log_dir = ctx.scratch_path("relay-log");
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < relays; ++r) {
      testing::detail::SpawnOptions so;
      so.argv = {NATSPUBSUB_RELAY_EXE, "--database", url, "--nats", ctx.nats_url(), "--env", "bench", "--app", "bench",
                 "--poll-interval", "20", "--no-migrate", "--relay-id", "bench-" + std::to_string(r)};
      so.log_file = log_dir + "/relay-" + std::to_string(r) + ".log";
      children.push_back(std::make_unique<testing::detail::ChildProcess>());
      children.back()->spawn(so);
    }
    const auto deadline = t0 + std::chrono::minutes(10);
    while (unsent() > 0 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    const double seconds = elapsed_seconds(t0);
    std::fprintf(stderr, "natspubsub-bench: relay_postgres_scaling: %d relay(s) done in %.1f s, reading the stream back\n",
                 relays, seconds);
    for (auto& c : children) c->stop(SIGTERM, std::chrono::seconds(10));
    if (unsent() > 0) throw std::runtime_error(std::to_string(relays) + " relays left rows unsent after 10 minutes");

    std::vector<int> last(kKeys, -1);
    std::size_t stored = 0, out_of_order = 0;
    std::set<std::string> seen;
    for (const auto& m : reader.read_stream(stream)) {
      auto it = position.find(m.msg_id);
      if (it == position.end()) continue;
      ++stored;
      seen.insert(m.msg_id);
      auto& previous = last[static_cast<std::size_t>(it->second.first)];
      if (it->second.second < previous) ++out_of_order;
      previous = std::max(previous, it->second.second);
    }
    if (stored != static_cast<std::size_t>(rows) || seen.size() != static_cast<std::size_t>(rows) || out_of_order != 0)
      throw std::runtime_error(std::to_string(relays) + " relays: stored " + std::to_string(stored) + ", distinct " +
                               std::to_string(seen.size()) + " of " + std::to_string(rows) + ", out of key order " +
                               std::to_string(out_of_order));
    raw.purge_stream(stream);
    std::fprintf(stderr, "natspubsub-bench: relay_postgres_scaling: %d relay(s) drained %d rows in %.1f s (%.0f msgs/s)\n",
                 relays, rows, seconds, rows / seconds);
    rates[relays].push_back(rows / seconds);
    return rows / seconds;
  };
  for (int rep = 0; rep < (s.quick ? 1 : s.slow_repetitions); ++rep)
    for (int relays : {1, 2, 4}) drain_with(relays);

  Result r;
  r.scenario = "relay_postgres_scaling";
  r.unit = "msgs/s";
  r.description = "2 natspubsub-relay processes vs 1 draining " + std::to_string(rows) + " PostgreSQL rows over " +
                  std::to_string(kKeys) + " keys (per-key order checked)";
  r.library_runs = rates[2];
  r.baseline_runs = rates[1];
  r.target = {Target::Kind::ratio_at_least, 1.0};
  r.load_avg = load;
  r.extra = {{"count", rows}, {"keys", kKeys}, {"relays_1_runs", rates[1]}, {"relays_2_runs", rates[2]},
             {"relays_4_runs", rates[4]}, {"relays_4_median", median(rates[4])}};
  return {r};
}

}  // namespace

std::vector<ScenarioGroup> relay_scenarios() {
  return {{"relay_sqlite", {"relay_sqlite"}, run_relay_sqlite},
          {"relay_postgres", {"relay_postgres"}, run_relay_postgres},
          {"relay_postgres_keys", {"relay_postgres_keys"}, run_relay_postgres_keys},
          {"relay_postgres_scaling", {"relay_postgres_scaling"}, run_relay_postgres_scaling}};
}

}  // namespace natspubsub::bench
