#include <natspubsub/middleware.hpp>

#include <cxxabi.h>

#include <cstdlib>
#include <random>
#include <typeinfo>

#include <natspubsub/log.hpp>

namespace natspubsub {
namespace {

using Clock = std::chrono::steady_clock;

thread_local std::optional<TraceContext> tls_trace;

bool is_lower_hex(std::string_view s) {
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

bool all_zero(std::string_view s) { return s.find_first_not_of('0') == std::string_view::npos; }

std::string random_hex(size_t digits) {
  thread_local std::mt19937_64 generator{std::random_device{}()};
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  do {
    out.clear();
    while (out.size() < digits) {
      uint64_t bits = generator();
      for (int i = 0; i < 16 && out.size() < digits; ++i, bits >>= 4) out += kHex[bits & 0xF];
    }
  } while (all_zero(out));  // an all-zero id is invalid in W3C trace context
  return out;
}

// A foreign trace id as a W3C one: 32 hex digits in any case, or a UUID (8-4-4-4-12).
std::optional<std::string> w3c_trace_id(std::string_view text) {
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    if (text.size() == 36 && (i == 8 || i == 13 || i == 18 || i == 23)) {
      if (c != '-') return std::nullopt;
      continue;
    }
    if (c >= 'A' && c <= 'F') c = static_cast<char>(c - 'A' + 'a');
    out += c;
  }
  if (out.size() != 32 || !is_lower_hex(out) || all_zero(out)) return std::nullopt;
  return out;
}

std::string demangle(const char* name) {
  int status = 0;
  char* readable = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string out = status == 0 && readable != nullptr ? readable : name;
  std::free(readable);
  return out;
}

}  // namespace

std::string current_exception_class() {
  // GCC and Clang name the type of the exception in flight, std::exception or not.
  const std::type_info* type = abi::__cxa_current_exception_type();
  return type != nullptr ? demangle(type->name()) : "unknown";
}

Next compose(const std::vector<Middleware>& chain, Next handler) {
  Next next = std::move(handler);
  for (auto it = chain.rbegin(); it != chain.rend(); ++it) {
    next = [mw = *it, inner = std::move(next)](const Message& m) { mw(m, inner); };
  }
  return next;
}

std::optional<TraceContext> TraceContext::parse(std::string_view h) {
  // version "00": 2 + 1 + 32 + 1 + 16 + 1 + 2 = 55 characters.
  if (h.size() != 55 || h[2] != '-' || h[35] != '-' || h[52] != '-') return std::nullopt;
  auto version = h.substr(0, 2), trace = h.substr(3, 32), span = h.substr(36, 16), flags = h.substr(53, 2);
  if (version != "00" || !is_lower_hex(trace) || !is_lower_hex(span) || !is_lower_hex(flags)) return std::nullopt;
  if (all_zero(trace) || all_zero(span)) return std::nullopt;
  TraceContext c;
  c.trace_id = std::string(trace);
  c.span_id = std::string(span);
  c.flags = static_cast<uint8_t>(std::stoi(std::string(flags), nullptr, 16));
  return c;
}

TraceContext TraceContext::child_of(const TraceContext& parent) {
  TraceContext c;
  c.trace_id = parent.trace_id;
  c.parent_span_id = parent.span_id;
  c.span_id = random_hex(16);
  c.flags = parent.flags;
  c.origin_trace_id = parent.origin_trace_id;
  return c;
}

TraceContext TraceContext::new_root() {
  TraceContext c;
  c.trace_id = random_hex(32);
  c.span_id = random_hex(16);
  c.flags = 1;
  return c;
}

std::string TraceContext::traceparent() const {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string flag_text{kHex[(flags >> 4) & 0xF], kHex[flags & 0xF]};
  return "00-" + trace_id + "-" + span_id + "-" + flag_text;
}

std::optional<TraceContext> current_trace() { return tls_trace; }

std::optional<std::string> current_traceparent() {
  if (!tls_trace) return std::nullopt;
  return tls_trace->traceparent();
}

TraceScope::TraceScope(TraceContext context) : previous_(std::move(tls_trace)) { tls_trace = std::move(context); }
TraceScope::~TraceScope() { tls_trace = std::move(previous_); }

void HandlerMetrics::record(const HandlerObservation& o) {
  std::lock_guard lock(mutex_);
  auto& slot = slots_[o.consumer];
  if (!slot) slot = std::make_unique<Slot>();
  slot->calls++;
  if (!o.ok) {
    slot->failures++;
    slot->failures_by_class[o.error_class]++;
  }
  slot->latency.record(o.duration);
}

std::map<std::string, HandlerMetrics::Entry> HandlerMetrics::snapshot() const {
  std::lock_guard lock(mutex_);
  std::map<std::string, Entry> out;
  for (const auto& [consumer, slot] : slots_) {
    out[consumer] = Entry{slot->calls, slot->failures, slot->failures_by_class, slot->latency.snapshot()};
  }
  return out;
}

Middleware HandlerMetrics::middleware() {
  return middleware::metrics([this](const HandlerObservation& o) { record(o); });
}

namespace middleware {

Middleware logging(spdlog::level::level_enum level) {
  return [level](const Message& m, const Next& next) {
    auto log = logger();
    const auto start = Clock::now();
    auto elapsed_ms = [&] {
      return std::chrono::duration_cast<std::chrono::duration<double, std::milli>>(Clock::now() - start).count();
    };
    log->log(level, "handling event {} ({}) from {} seq {} delivery {}", m.envelope.event_id, m.subject,
             m.metadata.stream, m.metadata.stream_sequence, m.metadata.deliveries);
    try {
      next(m);
    } catch (const std::exception& e) {
      log->warn("event {} ({}) delivery {} failed after {:.1f} ms: {}: {}", m.envelope.event_id, m.subject,
                m.metadata.deliveries, elapsed_ms(), current_exception_class(), e.what());
      throw;
    } catch (...) {
      log->warn("event {} ({}) delivery {} failed after {:.1f} ms: {} thrown", m.envelope.event_id, m.subject,
                m.metadata.deliveries, elapsed_ms(), current_exception_class());
      throw;
    }
    log->log(level, "handled event {} ({}) in {:.1f} ms", m.envelope.event_id, m.subject, elapsed_ms());
  };
}

Middleware metrics(std::function<void(const HandlerObservation&)> sink) {
  return [sink = std::move(sink)](const Message& m, const Next& next) {
    HandlerObservation o;
    o.subject = m.subject;
    o.consumer = m.metadata.consumer;
    o.deliveries = m.metadata.deliveries;
    const auto start = Clock::now();
    auto report = [&] {
      o.duration = std::chrono::duration_cast<Micros>(Clock::now() - start);
      try {
        sink(o);
      } catch (...) {
        // A broken metrics sink must not turn a handled message into a failed one.
        logger()->warn("metrics sink threw for {}; observation dropped", m.subject);
      }
    };
    try {
      next(m);
    } catch (...) {
      o.error_class = current_exception_class();
      report();
      throw;
    }
    o.ok = true;
    report();
  };
}

Middleware trace_context() {
  return [](const Message& m, const Next& next) {
    TraceContext ctx;
    if (auto parent = TraceContext::parse(m.header("traceparent"))) {
      ctx = TraceContext::child_of(*parent);
    } else {
      // NatsPubsub sends its trace id as a `trace_id` header (and in the envelope).
      std::string given = m.header("trace_id");
      if (given.empty() && m.envelope.trace_id) given = *m.envelope.trace_id;
      ctx = TraceContext::new_root();
      if (auto id = w3c_trace_id(given)) ctx.trace_id = *id;
      if (!given.empty() && given != ctx.trace_id) ctx.origin_trace_id = given;
    }
    TraceScope scope(std::move(ctx));
    next(m);
  };
}

}  // namespace middleware
}  // namespace natspubsub
