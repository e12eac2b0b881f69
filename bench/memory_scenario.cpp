// Peak RSS of a consumer working through a large backlog, each in a child process of its own
// (so each peak is its own), library and raw, at two backlog sizes: the peak must stay bounded
// and must not grow with the backlog.
#include <filesystem>
#include <sstream>

#include <natspubsub/connection.hpp>

#include "bench.hpp"
#include "consume.hpp"
#include "setup.hpp"

namespace natspubsub::bench {
namespace {

struct ChildResult {
  double peak_mb = 0;
  double rate = 0;
};

ChildResult run_child(Context& ctx, const std::string& side, const std::string& stream, const std::string& topic,
                      const std::string& durable, int count) {
  std::ostringstream cmd;
  cmd << "'" << Context::self_exe() << "' --child consume --side " << side << " --url '" << ctx.nats_url()
      << "' --stream " << stream << " --topic " << topic << " --durable " << durable << " --count " << count;
  const auto limit = std::chrono::seconds(120 + count / 1000);
  auto r = testing::run_command(cmd.str(), limit);
  if (r.status != 0)
    throw std::runtime_error("memory child (" + side + ", " + std::to_string(count) + ") failed with status " +
                             std::to_string(r.status) + ": " + r.error);
  auto j = nlohmann::json::parse(r.output);
  return {j.at("vm_hwm_kb").get<double>() / 1024.0, j.at("rate").get<double>()};
}

std::vector<Result> run_memory(Context& ctx) {
  const auto& s = ctx.settings();
  auto load = load_average();
  Connection nats(bench_config(ctx.nats_url()));
  const auto stream = ensure_bench_stream(nats);
  RawNats raw(ctx.nats_url());
  RawNats raw_async(ctx.nats_url(), s.publish_window);
  const std::string topic = "memory";
  const auto subject = bench_subject(topic);
  const int small = s.memory_small_backlog;
  const int big = s.memory_backlog;

  // About 450 bytes per stored message (envelope, headers, subject, overhead).
  const auto space = std::filesystem::space(std::filesystem::temp_directory_path());
  const double need_mb = big * 450.0 / (1024 * 1024);
  if (static_cast<double>(space.available) / (1024 * 1024) < need_mb * 2)
    throw std::runtime_error("memory scenario: " + std::to_string(static_cast<long>(need_mb)) +
                             " MB of stream storage needed, not enough free space in the temp directory");

  raw.purge_stream(stream);
  fill_backlog(raw_async, subject, topic, small);
  auto lib_small = run_child(ctx, "library", stream, topic, "mem-lib-small", small);
  auto raw_small = run_child(ctx, "raw", stream, topic, "mem-raw-small", small);
  // Grow the same stream to the big backlog; new durables start from its first message.
  fill_backlog(raw_async, subject, topic, big - small);
  auto lib_big = run_child(ctx, "library", stream, topic, "mem-lib-big", big);
  auto raw_big = run_child(ctx, "raw", stream, topic, "mem-raw-big", big);
  for (const auto* d : {"mem-lib-small", "mem-raw-small", "mem-lib-big", "mem-raw-big"}) raw.delete_consumer(stream, d);
  raw.purge_stream(stream);

  Result r;
  r.scenario = "memory_peak_rss";
  r.unit = "MB";
  r.description = "peak RSS (VmHWM) of a child process consuming a " + std::to_string(big) +
                  "-message backlog (file storage): Consumer (" + std::to_string(ConsumeTuning{}.concurrency) +
                  " workers, prefetch " + std::to_string(ConsumeTuning{}.prefetch) + ") vs raw pull loop";
  r.library_runs = {lib_big.peak_mb};
  r.baseline_runs = {raw_big.peak_mb};
  r.target = {Target::Kind::library_at_most, 100};
  // "Does not grow with the backlog": 10x the messages may not cost more than 10% (or 5 MB).
  const double growth = lib_big.peak_mb - lib_small.peak_mb;
  r.extra_met = growth <= std::max(5.0, lib_small.peak_mb * 0.10);
  r.load_avg = load;
  r.extra = {{"backlog", big},
             {"small_backlog", small},
             {"library_small_backlog_mb", lib_small.peak_mb},
             {"baseline_small_backlog_mb", raw_small.peak_mb},
             {"library_growth_mb", growth},
             {"library_rate", lib_big.rate},
             {"baseline_rate", raw_big.rate}};
  return {r};
}

}  // namespace

std::vector<ScenarioGroup> memory_scenarios() { return {{"memory", {"memory_peak_rss"}, run_memory}}; }

}  // namespace natspubsub::bench
