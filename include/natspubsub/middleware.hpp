#pragma once
// A chain of functions around every handler call. Each gets the message and `next`; it may act
// before and after, catch, or rethrow. A middleware that throws counts as a handler failure.
//
//   consumer.use(natspubsub::middleware::trace_context());   // W3C traceparent in, child span out
//   consumer.use(natspubsub::middleware::logging());
//   consumer.use(metrics.middleware());                      // natspubsub::HandlerMetrics metrics;
//   consumer.use([](const natspubsub::Message& m, const natspubsub::Next& next) {
//     auto tenant = m.header("x-tenant");                     // your own: runs around the handler
//     next(m);
//   });
//
// Inside a handler wrapped by trace_context(), pass the trace on to what you publish:
//   natspubsub::PublishOptions o;
//   o.traceparent = natspubsub::current_traceparent();
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <spdlog/common.h>

#include <natspubsub/message.hpp>
#include <natspubsub/stats.hpp>

namespace natspubsub {

using Next = std::function<void(const Message&)>;
using Middleware = std::function<void(const Message&, const Next&)>;

/// Wraps `handler` in `chain`: chain[0] runs first (outermost), the handler last.
[[nodiscard]] Next compose(const std::vector<Middleware>& chain, Next handler);

/// W3C trace context ("traceparent: 00-<trace id>-<span id>-<flags>").
struct TraceContext {
  std::string trace_id;        ///< 32 lower-case hex digits, not all zero
  std::string span_id;         ///< 16 lower-case hex digits, not all zero
  std::string parent_span_id;  ///< the span we continue from; empty for a new root
  uint8_t flags = 1;           ///< bit 0: sampled
  /// The trace id as the sender wrote it when that differs from `trace_id`: NatsPubsub's
  /// `trace_id` header and envelope field are free text (a UUID, "req-42"). Events published
  /// in this trace carry it on in their envelope, so the sender's tools still find them.
  std::string origin_trace_id;

  /// nullopt unless `header` is a valid version-00 traceparent.
  [[nodiscard]] static std::optional<TraceContext> parse(std::string_view header);
  /// A new span in the same trace, parented to `parent`.
  [[nodiscard]] static TraceContext child_of(const TraceContext& parent);
  /// A new trace (new trace id and span id), sampled.
  [[nodiscard]] static TraceContext new_root();
  [[nodiscard]] std::string traceparent() const;
};

/// The trace of the handler running on this thread (set by middleware::trace_context()).
[[nodiscard]] std::optional<TraceContext> current_trace();
/// current_trace()->traceparent(), for PublishOptions::traceparent.
[[nodiscard]] std::optional<std::string> current_traceparent();

/// Makes `context` the current trace on this thread until destroyed (then restores the previous).
class TraceScope {
 public:
  explicit TraceScope(TraceContext context);
  ~TraceScope();
  TraceScope(const TraceScope&) = delete;
  TraceScope& operator=(const TraceScope&) = delete;

 private:
  std::optional<TraceContext> previous_;
};

/// One handler call as seen by middleware::metrics().
struct HandlerObservation {
  std::string subject;
  std::string consumer;
  uint64_t deliveries = 0;
  bool ok = false;
  std::string error_class;  ///< empty when ok
  Micros duration{0};
};

/// Collects handler calls per consumer (durable); hand its middleware() to Consumer::use.
/// Thread-safe.
class HandlerMetrics {
 public:
  struct Entry {
    uint64_t calls = 0;
    uint64_t failures = 0;
    std::map<std::string, uint64_t> failures_by_class;
    LatencySnapshot latency;
  };

  void record(const HandlerObservation& observation);
  [[nodiscard]] std::map<std::string, Entry> snapshot() const;
  /// The middleware feeding this collector; the collector must outlive the consumer.
  [[nodiscard]] Middleware middleware();

 private:
  struct Slot {
    uint64_t calls = 0;
    uint64_t failures = 0;
    std::map<std::string, uint64_t> failures_by_class;
    LatencyHistogram latency;
  };
  mutable std::mutex mutex_;
  std::map<std::string, std::unique_ptr<Slot>> slots_;
};

namespace middleware {

/// Logs each call (start and end at `level`, failures at warn) with event id, subject,
/// sequence, delivery and duration.
[[nodiscard]] Middleware logging(spdlog::level::level_enum level = spdlog::level::debug);

/// Reports every call to `sink` (your metrics library), then rethrows a failure unchanged.
[[nodiscard]] Middleware metrics(std::function<void(const HandlerObservation&)> sink);

/// Continues the trace from the message's `traceparent` header, else from NatsPubsub's
/// `trace_id` header, else from the envelope's trace_id, and makes a child span current for the
/// handler: see current_traceparent(). A trace_id of 32 hex digits or a UUID becomes the W3C
/// trace id (lower case, no dashes); any other text starts a new W3C trace and is kept as
/// TraceContext::origin_trace_id.
[[nodiscard]] Middleware trace_context();

}  // namespace middleware

/// The type name of the exception being handled, demangled ("std::runtime_error", "int");
/// call only inside a catch block. "unknown" when the runtime cannot tell.
[[nodiscard]] std::string current_exception_class();

}  // namespace natspubsub
