#pragma once
// Consuming helpers shared by the consume, latency and memory scenarios (and the child process).
#include <string>

#include <natspubsub/consumer.hpp>

#include "bench.hpp"
#include "raw_nats.hpp"

namespace natspubsub::bench {

/// How both sides consume a backlog: the library's worker pool and prefetch, and the raw loop's
/// batch. Both ask the server for the same number of messages per pull.
/// How long one pull waits for a first message, both sides. Shorter than the library's default
/// (1 s) only so that stopping a consumer between runs is quick: with messages waiting, or
/// arriving every 0.5 ms, a pull never waits this long.
constexpr Millis kFetchExpiry{250};

struct ConsumeTuning {
  int concurrency = 4;  ///< the library's default worker count
  int prefetch = 60;    ///< so that a pull asks for up to 64, like the raw loop
  int raw_batch = 64;
};

/// Publishes `n` envelopes (topic `topic`, 128-byte message, fresh event ids) to `subject`,
/// async, and waits for every PubAck.
void fill_backlog(RawNats& raw_async, const std::string& subject, const std::string& topic, int n);

/// A Consumer on `topic` with `options` (durable set) until `n` messages are acked.
Throughput library_consume(Connection& nats, const std::string& topic, int n, SubscriptionOptions options,
                           Handler handler);

/// A raw pull loop on a new durable until `n` messages are fetched and acked.
Throughput raw_consume(RawNats& raw, const std::string& stream, const std::string& subject, const std::string& durable,
                       int n, int batch, bool ack_sync = false);

}  // namespace natspubsub::bench
