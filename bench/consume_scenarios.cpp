// Consuming: the Consumer runtime (fetch, decode the envelope, handler, ack) with a no-op
// handler and with the inbox (SQLite, PostgreSQL), against a hand-written pull loop
// (fetch + ack); and the end-to-end latency publish -> handler at a fixed rate.
#include <atomic>
#include <cstring>
#include <thread>

#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/inbox_handler.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/store/migrations.hpp>
#include <natspubsub/store/postgres.hpp>
#include <natspubsub/store/sqlite.hpp>

#include "bench.hpp"
#include "consume.hpp"
#include "raw_nats.hpp"
#include "setup.hpp"

namespace natspubsub::bench {

using Clock = std::chrono::steady_clock;

void fill_backlog(RawNats& raw_async, const std::string& subject, const std::string& topic, int n) {
  auto e = Envelope::make(topic, "bench", make_message(128));
  for (int i = 0; i < n; ++i) {
    e.event_id = new_uuid();
    raw_async.publish_async(subject.c_str(), e.encode(), e.event_id.c_str());
  }
  raw_async.complete_async();
}

Throughput library_consume(Connection& nats, const std::string& topic, int n, SubscriptionOptions options,
                           Handler handler) {
  const std::string durable = *options.durable;
  Consumer consumer(nats);
  consumer.subscribe(topic, std::move(handler), std::move(options));
  const auto deadline = Clock::now() + std::chrono::seconds(60 + n / 200);
  const auto t0 = Clock::now();
  const double cpu0 = process_cpu_seconds();
  consumer.start();
  while (consumer.stats(durable).acked < static_cast<uint64_t>(n)) {
    if (Clock::now() > deadline) {
      auto st = consumer.stats(durable);
      throw std::runtime_error("library consumer " + durable + ": " + std::to_string(st.acked) + " of " +
                               std::to_string(n) + " acked before the deadline (" + std::to_string(st.handler_errors) +
                               " handler errors)");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
  Throughput t{n / elapsed_seconds(t0), (process_cpu_seconds() - cpu0) * 1e6 / n};
  consumer.stop(Millis{5000});
  return t;
}

Throughput raw_consume(RawNats& raw, const std::string& stream, const std::string& subject, const std::string& durable,
                       int n, int batch, bool ack_sync) {
  const auto deadline = Clock::now() + std::chrono::seconds(60 + n / 200);
  const auto t0 = Clock::now();
  const double cpu0 = process_cpu_seconds();
  RawPullConsumer consumer(raw, stream, subject, durable);
  int got = 0;
  while (got < n) {
    if (Clock::now() > deadline)
      throw std::runtime_error("raw consumer " + durable + ": " + std::to_string(got) + " of " + std::to_string(n));
    got += consumer.fetch(std::min(batch, n - got), kFetchExpiry.count(), ack_sync, [](natsMsg*) {});
  }
  // Acks are fire-and-forget: the flush makes the last ones reach the server inside the time.
  check(natsConnection_FlushTimeout(raw.nc(), 5000), "flushing acks");
  return {n / elapsed_seconds(t0), (process_cpu_seconds() - cpu0) * 1e6 / n};
}

namespace {

// The same backlog for both sides of a repetition: each side gets its own new durable on it.
struct ConsumeBench {
  Context& ctx;
  Connection nats;
  std::string stream;
  RawNats raw;
  RawNats raw_async;
  std::string topic;
  std::string subject;
  int run = 0;

  ConsumeBench(Context& c, std::string t)
      : ctx(c),
        nats(bench_config(c.nats_url())),
        stream(ensure_bench_stream(nats)),
        raw(c.nats_url()),
        raw_async(c.nats_url(), c.settings().publish_window),
        topic(std::move(t)),
        subject(bench_subject(topic)) {
    raw.purge_stream(stream);
  }
  ~ConsumeBench() {
    try {
      raw.purge_stream(stream);
    } catch (...) {
    }
  }

  void fresh_backlog(int n) {
    raw.purge_stream(stream);
    fill_backlog(raw_async, subject, topic, n);
  }
  Throughput library(int n, SubscriptionOptions o, Handler handler) {
    fresh_backlog(n);
    o.durable = "lib-" + topic + "-" + std::to_string(++run);
    auto t = library_consume(nats, topic, n, o, std::move(handler));
    raw.delete_consumer(stream, *o.durable);
    return t;
  }
  Throughput baseline(int n, int batch, bool ack_sync = false) {
    fresh_backlog(n);
    const std::string durable = "raw-" + topic + "-" + std::to_string(++run);
    auto t = raw_consume(raw, stream, subject, durable, n, batch, ack_sync);
    raw.delete_consumer(stream, durable);
    return t;
  }
};

// Runs both sides, recording rates as the samples and CPU per message on the side.
struct Sides {
  std::vector<double> lib_cpu;
  std::vector<double> base_cpu;
  Sample library(std::function<Throughput()> f) {
    return [this, f] {
      auto t = f();
      lib_cpu.push_back(t.cpu_us_per_msg);
      return t.rate;
    };
  }
  Sample baseline(std::function<Throughput()> f) {
    return [this, f] {
      auto t = f();
      base_cpu.push_back(t.cpu_us_per_msg);
      return t.rate;
    };
  }
  void add_to(Result& r) const {
    r.extra["library_cpu_us_per_msg"] = median(lib_cpu);
    r.extra["baseline_cpu_us_per_msg"] = median(base_cpu);
  }
};

SubscriptionOptions tuned(const ConsumeTuning& t) {
  SubscriptionOptions o;
  o.concurrency = t.concurrency;
  o.prefetch = t.prefetch;
  o.fetch_timeout = kFetchExpiry;
  return o;
}

std::vector<Result> run_consume(Context& ctx) {
  const auto& s = ctx.settings();
  const ConsumeTuning t;
  auto load = load_average();
  ConsumeBench b(ctx, "consume");
  const int n = s.consume_count;
  Sides sides;
  auto [lib_runs, raw_runs] = interleave(
      s.slow_repetitions, sides.library([&] { return b.library(n, tuned(t), [](const Message&) {}); }),
      sides.baseline([&] { return b.baseline(n, t.raw_batch); }),
      [&] {
        (void)b.library(std::max(200, n / 10), tuned(t), [](const Message&) {});
        (void)b.baseline(std::max(200, n / 10), t.raw_batch);
      });
  // The same loop with natsMsg_AckSync: the simplest hand-written loop that, like the Consumer,
  // counts an ack once the server confirmed it (the Consumer pipelines its acks and collects
  // the confirmations instead of waiting for each). Fewer messages, since each ack is a round trip.
  std::vector<double> ack_sync_runs;
  const int n_sync = std::max(200, n / 5);
  for (int r = 0; r < std::max(1, s.slow_repetitions / 2); ++r) ack_sync_runs.push_back(b.baseline(n_sync, t.raw_batch, true).rate);

  Result r;
  r.scenario = "consume";
  r.unit = "msgs/s";
  r.description = "Consumer (" + std::to_string(t.concurrency) + " workers, prefetch " + std::to_string(t.prefetch) +
                  "; fetch, decode envelope, no-op handler, pipelined ack confirmed by the server) vs raw pull loop (batch " +
                  std::to_string(t.raw_batch) + ", fetch + natsMsg_Ack)";
  r.library_runs = lib_runs;
  r.baseline_runs = raw_runs;
  r.target = {Target::Kind::ratio_at_least, 0.9};
  r.load_avg = load;
  r.extra = {{"count", n},
             {"concurrency", t.concurrency},
             {"prefetch", t.prefetch},
             {"raw_batch", t.raw_batch},
             {"baseline_ack_sync", median(ack_sync_runs)},
             {"ratio_to_ack_sync_baseline", median(lib_runs) / median(ack_sync_runs)}};
  sides.add_to(r);
  return {r};
}

// The inbox: every message runs in a database transaction with its inbox row.
Result run_inbox(Context& ctx, const std::string& backend, const InboxHandler::DatabaseFactory& open) {
  const auto& s = ctx.settings();
  const ConsumeTuning t;
  auto load = load_average();
  ConsumeBench b(ctx, "inbox_" + backend);
  const int n = s.inbox_count;
  Sides sides;
  // max_batch 1: one transaction per message (how every message ran before batches).
  // write: the handler inserts one row, so each message also takes its savepoint.
  const int default_batch = InboxHandler(open, {}).max_batch();
  std::vector<double> mean_batch;  // deliveries per batched transaction, per run
  auto library = [&](int count, int max_batch, bool write) {
    InboxHandler handler(open, [write](const Message& m, store::Transaction& tx) {
      if (write) tx.execute("INSERT INTO bench_effects (event_id) VALUES ($1)", {m.envelope.event_id});
    });
    handler.max_batch(max_batch);
    auto result = b.library(count, tuned(t), handler);
    if (max_batch > 1 && !write && handler.batches() > 0)
      mean_batch.push_back(static_cast<double>(handler.batched()) / static_cast<double>(handler.batches()));
    if (handler.processed() != static_cast<uint64_t>(count))
      throw std::runtime_error("inbox " + backend + ": " + std::to_string(handler.processed()) + " processed of " +
                               std::to_string(count));
    return result;
  };
  auto [lib_runs, raw_runs] = interleave(
      s.slow_repetitions, sides.library([&] { return library(n, default_batch, false); }),
      sides.baseline([&] { return b.baseline(n, t.raw_batch); }), [&] {
        (void)library(std::max(50, n / 10), default_batch, false);
        (void)b.baseline(std::max(50, n / 10), t.raw_batch);
      });
  // Not interleaved with the baseline: the same library with batches off, and with a handler
  // that writes one row (batches on), for the ratio of each to the baseline median above.
  std::vector<double> per_message_runs;
  std::vector<double> one_write_runs;
  for (int i = 0; i < s.slow_repetitions; ++i) {
    per_message_runs.push_back(library(n, 1, false).rate);
    one_write_runs.push_back(library(n, default_batch, true).rate);
  }
  Result r;
  r.scenario = "consume_inbox_" + backend;
  r.unit = "msgs/s";
  r.description = "Consumer + InboxHandler (" + backend + ", no-op handler in the inbox transaction, " +
                  std::to_string(t.concurrency) + " workers) vs raw pull loop (batch " + std::to_string(t.raw_batch) +
                  ", fetch + natsMsg_Ack)";
  r.library_runs = lib_runs;
  r.baseline_runs = raw_runs;
  r.target = {Target::Kind::ratio_at_least, 0.3};
  r.load_avg = load;
  r.extra = {{"count", n},
             {"concurrency", t.concurrency},
             {"prefetch", t.prefetch},
             {"max_batch", default_batch},
             {"mean_batch", mean_batch.empty() ? 0.0 : median(mean_batch)},
             {"library_per_message", median(per_message_runs)},
             {"ratio_per_message", median(per_message_runs) / median(raw_runs)},
             {"library_one_write", median(one_write_runs)},
             {"ratio_one_write", median(one_write_runs) / median(raw_runs)}};
  sides.add_to(r);
  return r;
}

std::vector<Result> run_inbox_sqlite(Context& ctx) {
  const auto path = ctx.scratch_path("inbox") + "/inbox.db";
  {
    store::SqliteDatabase db(path);
    store::migrate(db);
    db.in_transaction([](store::Transaction& tx) { tx.execute("CREATE TABLE bench_effects (event_id TEXT PRIMARY KEY)"); });
  }
  return {run_inbox(ctx, "sqlite", [path] { return std::make_unique<store::SqliteDatabase>(path); })};
}

std::vector<Result> run_inbox_postgres(Context& ctx) {
  const auto url = ctx.postgres().create_database("inbox");
  {
    store::PostgresDatabase db(url);
    store::migrate(db);
    db.in_transaction([](store::Transaction& tx) { tx.execute("CREATE TABLE bench_effects (event_id TEXT PRIMARY KEY)"); });
  }
  return {run_inbox(ctx, "postgres", [url] { return std::make_unique<store::PostgresDatabase>(url); })};
}

// ---- end-to-end latency ------------------------------------------------------------------------

// Publish times by message index, shared between the publishing thread and the handler.
struct LatencyLog {
  explicit LatencyLog(int n) : sent_ns(static_cast<std::size_t>(n)), latency_us(static_cast<std::size_t>(n), -1) {}
  std::vector<std::atomic<int64_t>> sent_ns;
  std::vector<double> latency_us;  // written once per index, by whichever thread handles it
  std::atomic<int> received{0};

  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
  }
  void sent(int i) { sent_ns[static_cast<std::size_t>(i)].store(now_ns(), std::memory_order_release); }
  void handled(int i) {
    if (i < 0 || i >= static_cast<int>(latency_us.size())) return;
    const auto t = sent_ns[static_cast<std::size_t>(i)].load(std::memory_order_acquire);
    latency_us[static_cast<std::size_t>(i)] = static_cast<double>(now_ns() - t) / 1000.0;
    received.fetch_add(1, std::memory_order_release);
  }
  void wait_all(int n, std::chrono::seconds limit) const {
    const auto deadline = Clock::now() + limit;
    while (received.load(std::memory_order_acquire) < n) {
      if (Clock::now() > deadline)
        throw std::runtime_error("latency: " + std::to_string(received.load()) + " of " + std::to_string(n) + " handled");
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
};

// Calls publish(i) at `rate` per second for `n` messages, on schedule (a late publish is not
// made up for by a burst).
template <typename F>
void paced(int n, int rate, F&& publish) {
  const auto period = std::chrono::nanoseconds(1000000000LL / rate);
  const auto start = Clock::now();
  for (int i = 0; i < n; ++i) {
    std::this_thread::sleep_until(start + period * i);
    publish(i);
  }
}

struct Percentiles {
  double p50 = 0;
  double p99 = 0;
};

Percentiles percentiles(const std::vector<double>& v) { return {quantile(v, 0.50), quantile(v, 0.99)}; }

std::vector<Result> run_latency(Context& ctx) {
  const auto& s = ctx.settings();
  auto load = load_average();
  const int n = s.latency_rate * s.latency_seconds;
  Connection nats(bench_config(ctx.nats_url()));
  const auto stream = ensure_bench_stream(nats);
  Publisher publisher(nats);
  RawNats raw(ctx.nats_url());
  raw.purge_stream(stream);
  int run = 0;
  std::vector<double> lib_p50, lib_p99, raw_p50, raw_p99;

  // Each run starts on an empty stream: a new durable must not see an earlier run's messages.
  auto library = [&](int count) {
    raw.purge_stream(stream);
    LatencyLog log(count);
    const std::string durable = "lib-latency-" + std::to_string(++run);
    {
      Consumer consumer(nats);
      SubscriptionOptions o;  // the defaults: 4 workers, a pull never asks for more than the free ones
      o.durable = durable;
      o.fetch_timeout = kFetchExpiry;
      consumer.subscribe("latency", [&](const Message& m) { log.handled(m.envelope.message.value("order_id", -1)); },
                         o);
      consumer.start();
      std::this_thread::sleep_for(std::chrono::milliseconds(100));  // the first pull is waiting
      auto message = make_message(128);
      paced(count, s.latency_rate, [&](int i) {
        message["order_id"] = i;
        log.sent(i);
        (void)publisher.publish("latency", message);
      });
      log.wait_all(count, std::chrono::seconds(30));
      consumer.stop(Millis{5000});
    }
    raw.delete_consumer(stream, durable);
    return percentiles(log.latency_us);
  };
  auto baseline = [&](int count) {
    raw.purge_stream(stream);
    LatencyLog log(count);
    const std::string durable = "raw-latency-" + std::to_string(++run);
    const auto subject = bench_subject("raw_latency");
    RawNats conn(ctx.nats_url());  // one connection for both directions, like the library side
    RawPullConsumer consumer(conn, stream, subject, durable);
    std::jthread fetcher([&](std::stop_token st) {
      while (!st.stop_requested() && log.received.load() < count) {
        consumer.fetch(64, kFetchExpiry.count(), false, [&](natsMsg* m) {
          const char* id = nullptr;
          if (natsMsgHeader_Get(m, "Nats-Msg-Id", &id) == NATS_OK && id != nullptr) {
            const char* dash = std::strrchr(id, '-');
            log.handled(dash != nullptr ? std::atoi(dash + 1) : -1);
          }
        });
      }
    });
    const auto body = make_message(128).dump();
    const auto prefix = "lat-" + std::to_string(run) + "-";
    paced(count, s.latency_rate, [&](int i) {
      const auto id = prefix + std::to_string(i);
      log.sent(i);
      conn.publish_sync(subject.c_str(), body, id.c_str());
    });
    log.wait_all(count, std::chrono::seconds(30));
    fetcher.request_stop();
    fetcher.join();
    raw.delete_consumer(stream, durable);
    return percentiles(log.latency_us);
  };
  auto lib_sample = [&] {
    auto p = library(n);
    lib_p50.push_back(p.p50);
    lib_p99.push_back(p.p99);
    return p.p50;
  };
  auto raw_sample = [&] {
    auto p = baseline(n);
    raw_p50.push_back(p.p50);
    raw_p99.push_back(p.p99);
    return p.p50;
  };
  (void)interleave(s.slow_repetitions, lib_sample, raw_sample, [&] {
    (void)library(std::max(200, n / 10));
    (void)baseline(std::max(200, n / 10));
  });
  raw.purge_stream(stream);

  auto make = [&](const std::string& name, const std::vector<double>& lib, const std::vector<double>& base) {
    Result r;
    r.scenario = name;
    r.unit = "us";
    r.description = "publish -> handler at " + std::to_string(s.latency_rate) +
                    " msgs/s: Publisher::publish + Consumer (4 workers, no prefetch: the defaults) vs js_PublishMsg + raw pull loop";
    r.library_runs = lib;
    r.baseline_runs = base;
    r.target = {Target::Kind::ratio_at_most, 1.5};
    r.load_avg = load;
    r.extra = {{"count", n}, {"rate", s.latency_rate}};
    return r;
  };
  return {make("e2e_latency_p50", lib_p50, raw_p50), make("e2e_latency_p99", lib_p99, raw_p99)};
}

}  // namespace

std::vector<ScenarioGroup> consume_scenarios() {
  return {{"consume", {"consume"}, run_consume},
          {"consume_inbox_sqlite", {"consume_inbox_sqlite"}, run_inbox_sqlite},
          {"consume_inbox_postgres", {"consume_inbox_postgres"}, run_inbox_postgres},
          {"latency", {"e2e_latency_p50", "e2e_latency_p99"}, run_latency}};
}

}  // namespace natspubsub::bench
