// Publishing without the outbox: Publisher::publish (waits for each PubAck) and
// Publisher::publish_batch (async window), against js_PublishMsg / js_PublishMsgAsync.
#include <natspubsub/connection.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/topology.hpp>

#include "bench.hpp"
#include "raw_nats.hpp"
#include "setup.hpp"

namespace natspubsub::bench {
namespace {

// Ids unique across the whole run: the stream's duplicate window would otherwise drop repeats.
std::string raw_id(const char* side, int run, int i) {
  return std::string(side) + "-" + std::to_string(run) + "-" + std::to_string(i);
}

std::vector<Result> run_publish(Context& ctx) {
  const auto& s = ctx.settings();
  auto load = load_average();
  Connection nats(bench_config(ctx.nats_url()));
  auto stream = ensure_bench_stream(nats);
  Publisher publisher(nats);
  RawNats raw(ctx.nats_url());
  raw.purge_stream(stream);

  const auto message = make_message(128);
  const auto body = message.dump();  // the baseline's body: the same 128 bytes of JSON
  const auto raw_subject = bench_subject("raw_sync");
  int run = 0;
  std::vector<double> lib_cpu, raw_cpu;  // client CPU per message, this process only
  auto timed = [](std::vector<double>& cpu, int n, auto&& work) {
    const double c0 = process_cpu_seconds();
    auto t0 = std::chrono::steady_clock::now();
    work();
    const double rate = n / elapsed_seconds(t0);
    cpu.push_back((process_cpu_seconds() - c0) * 1e6 / n);
    return rate;
  };

  // --- publish, waiting for each PubAck
  auto lib_sync = [&](int n) {
    return timed(lib_cpu, n, [&] {
      for (int i = 0; i < n; ++i) (void)publisher.publish("sync", message);
    });
  };
  auto raw_sync = [&](int n) {
    const int r = ++run;
    return timed(raw_cpu, n, [&] {
      for (int i = 0; i < n; ++i) raw.publish_sync(raw_subject.c_str(), body, raw_id("s", r, i).c_str());
    });
  };
  const int n_sync = s.publish_sync_count;
  auto [lib_runs, raw_runs] = interleave(
      s.repetitions, [&] { return lib_sync(n_sync); }, [&] { return raw_sync(n_sync); },
      [&] {
        lib_sync(std::max(20, n_sync / 10));
        raw_sync(std::max(20, n_sync / 10));
        lib_cpu.clear();
        raw_cpu.clear();
      });
  Result sync;
  sync.scenario = "publish_sync";
  sync.unit = "msgs/s";
  sync.description = "Publisher::publish (envelope, Nats-Msg-Id + topic headers, wait PubAck) vs js_PublishMsg "
                     "(128-byte JSON body, Nats-Msg-Id)";
  sync.library_runs = lib_runs;
  sync.baseline_runs = raw_runs;
  sync.target = {Target::Kind::ratio_at_least, 0.9};
  sync.load_avg = load;
  sync.extra = {{"count", n_sync},
                {"library_body_bytes", publisher.prepare("sync", message).payload.size()},
                {"baseline_body_bytes", body.size()},
                {"library_cpu_us_per_msg", median(lib_cpu)},
                {"baseline_cpu_us_per_msg", median(raw_cpu)}};

  // --- batch publish with an async window
  load = load_average();
  lib_cpu.clear();
  raw_cpu.clear();
  raw.purge_stream(stream);
  RawNats raw_async(ctx.nats_url(), s.publish_window);
  const auto raw_async_subject = bench_subject("raw_batch");
  BatchOptions bo;
  bo.window = s.publish_window;
  auto lib_batch = [&](int n) {
    // The events are the caller's data, built before the clock starts like the baseline's body.
    std::vector<OutgoingEvent> events(static_cast<std::size_t>(n), OutgoingEvent{"batch", message, {}});
    std::vector<PublishResult> results;
    const double rate = timed(lib_cpu, n, [&] { results = publisher.publish_batch(events, bo); });
    for (const auto& r : results)
      if (!r) throw std::runtime_error("library batch publish failed: " + r.error->message);
    return rate;
  };
  auto raw_batch = [&](int n) {
    const int r = ++run;
    return timed(raw_cpu, n, [&] {
      for (int i = 0; i < n; ++i) raw_async.publish_async(raw_async_subject.c_str(), body, raw_id("b", r, i).c_str());
      raw_async.complete_async();
    });
  };
  // The same raw loop sending what the library sends (the encoded envelope, also a topic header),
  // encoded before the clock starts: separates the cost of the bigger message on the server
  // from the library's own work.
  std::vector<double> same_bytes_runs;
  auto raw_same_bytes = [&](int n) {
    std::vector<RawMessage> prepared;
    prepared.reserve(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) prepared.push_back(publisher.prepare("batch", message));
    std::vector<double> unused;
    return timed(unused, n, [&] {
      for (const auto& m : prepared) raw_async.publish_async(m.subject.c_str(), m.payload, m.msg_id.c_str(), "topic", "batch");
      raw_async.complete_async();
    });
  };
  const int n_batch = s.publish_batch_count;
  auto [lib_b, raw_b] = interleave(
      s.repetitions, [&] { return lib_batch(n_batch); },
      [&] {
        const double rate = raw_batch(n_batch);
        same_bytes_runs.push_back(raw_same_bytes(n_batch));
        return rate;
      },
      [&] {
        lib_batch(std::max(100, n_batch / 10));
        raw_batch(std::max(100, n_batch / 10));
        lib_cpu.clear();
        raw_cpu.clear();
      });
  Result batch;
  batch.scenario = "publish_batch";
  batch.unit = "msgs/s";
  batch.description = "Publisher::publish_batch (window " + std::to_string(s.publish_window) +
                      ", per-message results) vs js_PublishMsgAsync (MaxPending " +
                      std::to_string(s.publish_window) + ", ack handler)";
  batch.library_runs = lib_b;
  batch.baseline_runs = raw_b;
  batch.target = {Target::Kind::ratio_at_least, 0.9};
  batch.load_avg = load;
  batch.extra = {{"count", n_batch},
                 {"window", s.publish_window},
                 {"library_body_bytes", publisher.prepare("batch", message).payload.size()},
                 {"baseline_body_bytes", body.size()},
                 {"baseline_same_bytes", median(same_bytes_runs)},
                 {"ratio_to_same_bytes_baseline", median(lib_b) / median(same_bytes_runs)},
                 {"library_cpu_us_per_msg", median(lib_cpu)},
                 {"baseline_cpu_us_per_msg", median(raw_cpu)}};
  raw.purge_stream(stream);
  return {sync, batch};
}

}  // namespace

std::vector<ScenarioGroup> publish_scenarios() {
  return {{"publish", {"publish_sync", "publish_batch"}, run_publish}};
}

}  // namespace natspubsub::bench
