// natspubsub-dlq: list, show, replay, purge and count dead letters; list and retry failed
// outbox rows. See README "The DLQ tool".
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <optional>
#include <set>

#include <nats/nats.h>
#include <spdlog/spdlog.h>

#include <natspubsub/connection.hpp>
#include <natspubsub/dlq.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/log.hpp>
#include <natspubsub/outbox.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/store/database.hpp>
#include <natspubsub/topology.hpp>
#include <natspubsub/version.hpp>

#include "common.hpp"
#include "dead_letter_stream.hpp"

using namespace natspubsub;
using namespace natspubsub::workers;

namespace {

using Clock = std::chrono::steady_clock;
constexpr int kExitInterrupted = 130;  // 128 + SIGINT, as shells report it
constexpr size_t kReplayWindow = 256;  // replays in flight, then their letters are deleted
constexpr int kUnansweredRetries = 3;  // rounds of asking again for replays without an answer

// Set by SIGINT/SIGTERM during replay and purge; a lock-free atomic store is async-signal-safe.
std::atomic<bool> g_interrupted{false};
static_assert(std::atomic<bool>::is_always_lock_free);
extern "C" void on_interrupt(int) { g_interrupted.store(true, std::memory_order_relaxed); }

/// A bad argument: one line for the person, exit 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

std::optional<uint64_t> parse_uint(const std::string& text) {
  uint64_t n = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), n);
  if (text.empty() || ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return n;
}

// "90s", "15m", "2h", "3d", "1w" back from now, or an RFC 3339 time.
SystemTime parse_since(const std::string& text) {
  const std::string rule = "--since: expected an age (90s, 15m, 2h, 3d, 1w) or an RFC 3339 time, got \"" + text + "\"";
  const std::string units = "smhdw";
  if (!text.empty() && units.find(text.back()) != std::string::npos &&
      text.find_first_not_of("0123456789") == text.size() - 1) {
    auto n = parse_uint(text.substr(0, text.size() - 1));
    const uint64_t unit = text.back() == 's' ? 1 : text.back() == 'm' ? 60 : text.back() == 'h' ? 3600
                          : text.back() == 'd' ? 86400 : 604800;
    constexpr uint64_t kMaxSeconds = 100ULL * 366 * 86400;  // a century: anything older is "all"
    if (!n) throw UsageError(rule);
    if (*n > kMaxSeconds / unit) throw UsageError("--since: " + text + " is more than a century");
    return now_ms() - std::chrono::seconds(static_cast<int64_t>(*n * unit));
  }
  try {
    return parse_timestamp(text, "--since");
  } catch (const std::exception&) {
    throw UsageError(rule);
  }
}

struct Filters {
  std::string topic;
  std::string reason;
  std::string since;
  size_t limit = 0;  // 0: no limit
  std::optional<SystemTime> since_time;

  [[nodiscard]] bool matches(const DlqEntry& e) const {
    if (!e.letter) return false;
    const auto& c = e.letter->context;
    if (!topic.empty() && e.topic != topic) return false;
    if (!reason.empty() && c.reason_text() != reason) return false;
    if (since_time && c.published_at < *since_time) return false;
    return true;
  }
};

std::string short_text(std::string s, size_t n) {
  for (auto& c : s)
    if (c == '\n' || c == '\r' || c == '\t') c = ' ';
  return s.size() <= n ? s : s.substr(0, n - 1) + "~";
}

nlohmann::json entry_json(const DlqEntry& e) {
  const auto& l = *e.letter;
  const auto& c = l.context;
  return {{"seq", e.seq},
          {"subject", l.original_subject},
          {"topic", e.topic},
          {"event_id", c.event_id},
          {"reason", c.reason_text()},
          {"deliveries", c.deliveries},
          {"error_class", c.error_class},
          {"error_message", c.error_message},
          {"consumer", c.consumer},
          {"dlq_stream", e.stream},
          {"original_stream", c.stream},
          {"original_seq", c.sequence},
          {"body_omitted", c.body_omitted},
          {"format", to_string(e.format)},
          {"dead_lettered_at", format_timestamp(c.published_at)}};
}

bool confirm(const std::string& question, bool yes) {
  if (yes) return true;
  if (!isatty(STDIN_FILENO)) {
    std::cerr << question << " Refusing without --yes (stdin is not a terminal).\n";
    return false;
  }
  std::cerr << question << " [y/N] " << std::flush;
  std::string answer;
  std::getline(std::cin, answer);
  return answer == "y" || answer == "Y" || answer == "yes";
}

// A progress line with rate and time left, on a terminal only (stderr), at most 5 times a second.
class Progress {
 public:
  explicit Progress(const char* verb) : verb_(verb), enabled_(isatty(STDERR_FILENO) != 0) {}
  ~Progress() { finish(); }
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  void step(uint64_t done, uint64_t total) {
    if (!enabled_ || total < 50) return;
    const auto now = Clock::now();
    if (done < total && now - last_ < std::chrono::milliseconds(200)) return;
    last_ = now;
    const double seconds = std::chrono::duration<double>(now - start_).count();
    const double rate = seconds > 0 ? static_cast<double>(done) / seconds : 0;
    const double left = rate > 0 ? static_cast<double>(total - std::min(done, total)) / rate : 0;
    std::fprintf(stderr, "\r%s %llu/%llu (%.0f%%), %.0f/s, %.0fs left   ", verb_, static_cast<unsigned long long>(done),
                 static_cast<unsigned long long>(total), 100.0 * static_cast<double>(done) / static_cast<double>(total),
                 rate, left);
    shown_ = true;
  }
  void finish() {
    if (shown_) std::fprintf(stderr, "\n");
    shown_ = false;
  }

 private:
  const char* verb_;
  bool enabled_;
  bool shown_ = false;
  Clock::time_point start_ = Clock::now();
  Clock::time_point last_{};
};

// The streams holding the app's letters: its own first (the one a bare sequence means), then
// NatsPubsub's. A letter is named by "SEQ" in the first, or "STREAM:SEQ" in any.
class Sources {
 public:
  explicit Sources(std::vector<DeadLetterStream> streams) : streams_(std::move(streams)) {}

  [[nodiscard]] const std::vector<DeadLetterStream>& all() const { return streams_; }
  [[nodiscard]] const DeadLetterStream& primary() const { return streams_.front(); }
  [[nodiscard]] const DeadLetterStream& named(const std::string& name) const {
    for (const auto& s : streams_)
      if (s.name() == name) return s;
    throw UsageError("no DLQ stream " + name + " (the app's are: " + names() + ")");
  }
  [[nodiscard]] std::string names() const {
    std::string out;
    for (const auto& s : streams_) out += (out.empty() ? "" : " and ") + s.name();
    return out;
  }
  /// How a letter is named on the command line and in the table.
  [[nodiscard]] std::string label(const DlqEntry& e) const {
    return e.stream == primary().name() ? std::to_string(e.seq) : e.stream + ":" + std::to_string(e.seq);
  }
  /// "SEQ" or "STREAM:SEQ"; nullopt when it names no message; UsageError when it is no sequence.
  [[nodiscard]] std::optional<DlqEntry> get(const std::string& spec) const {
    const auto colon = spec.rfind(':');
    const auto& stream = colon == std::string::npos ? primary() : named(spec.substr(0, colon));
    const std::string number = colon == std::string::npos ? spec : spec.substr(colon + 1);
    auto seq = parse_uint(number);
    if (!seq || *seq == 0) throw UsageError("\"" + spec + "\" is not a DLQ sequence (SEQ or STREAM:SEQ)");
    return stream.get(*seq);
  }

 private:
  std::vector<DeadLetterStream> streams_;
};

/// Every dead letter matching the filters, oldest first per stream; counts what is no dead letter.
std::vector<DlqEntry> collect(const Sources& sources, const Filters& f, size_t* not_letters = nullptr) {
  std::vector<DlqEntry> out;
  for (const auto& dlq : sources.all()) {
    Progress progress("reading");
    bool more = true;
    dlq.scan(
        [&](DlqEntry&& e) {
          if (!e.letter) {
            if (not_letters != nullptr) ++*not_letters;
            spdlog::warn("{} sequence {} is not a dead letter: {}", dlq.name(), e.seq, e.problem);
            return true;
          }
          if (!f.matches(e)) return true;
          out.push_back(std::move(e));
          more = f.limit == 0 || out.size() < f.limit;
          return more;
        },
        [&](uint64_t done, uint64_t total) { progress.step(done, total); });
    if (!more) break;
  }
  return out;
}

/// Finds by "SEQ", "STREAM:SEQ" or by event id.
std::optional<DlqEntry> find(const Sources& sources, const std::string& id) {
  const bool digits = !id.empty() && id.find_first_not_of("0123456789") == std::string::npos;
  if (digits || id.find(':') != std::string::npos) return sources.get(id);
  std::optional<DlqEntry> found;
  for (const auto& dlq : sources.all()) {
    dlq.scan([&](DlqEntry&& e) {
      if (e.letter && e.letter->context.event_id == id) {
        found = std::move(e);
        return false;
      }
      return true;
    });
    if (found) break;
  }
  return found;
}

// Where replays go: the failed consumer's replay route (its durable on the stream that holds
// the replay subjects, the default one or one the consumer adopted), checked once per consumer.
class ReplayRoutes {
 public:
  ReplayRoutes(Connection& nats, const Config& config) : nats_(nats), config_(config) {}

  /// The replay subject for `consumer` of `stream`; throws DlqFormatError saying why there is none.
  std::string subject_for(const std::string& stream, const std::string& consumer) {
    if (consumer.empty() || stream.empty())
      throw DlqFormatError("the letter names no consumer, so there is no replay route: use --to-subject");
    const std::string subject = replay_subject(config_, stream, consumer);
    const std::string durable = replay_durable(stream, consumer);
    auto it = checked_.find(subject);
    if (it == checked_.end()) {
      std::string problem;
      try {
        Topology topology(nats_);
        auto holder = topology.stream_for(subject);
        if (!holder)
          problem = "no stream holds the replay subjects " + Topology::replay_stream_spec(config_).subjects.front();
        else if (!topology.consumer_exists(*holder, durable))
          problem = "consumer " + consumer + " of " + stream + " has no replay durable " + durable + " on " + *holder;
      } catch (const NatsError& e) {
        problem = std::string("the replay route cannot be read: ") + e.what();
      }
      if (!problem.empty())
        problem += ": start that consumer once with this version (it creates its replay route), or use --to-subject";
      it = checked_.emplace(subject, problem).first;
    }
    if (!it->second.empty()) throw DlqFormatError(it->second);
    return subject;
  }

 private:
  Connection& nats_;
  const Config& config_;
  std::map<std::string, std::string> checked_;  // replay subject -> problem ("" when routable)
};

// JSON for a person's terminal or a script: bytes that are not UTF-8 (a careless producer's
// headers) are replaced, never a reason to fail the command.
std::string json_text(const nlohmann::json& j) {
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

struct Outcome {
  std::vector<uint64_t> done;         // replayed (and removed) or purged
  std::vector<uint64_t> failed;       // not replayed / not purged: still in the DLQ
  std::vector<uint64_t> duplicates;   // of failed: the stream already held the replay id
  std::vector<uint64_t> not_removed;  // replayed, but still in the DLQ: the tool says so
  std::vector<uint64_t> uncertain;    // of failed: never acknowledged, may have been stored
  bool interrupted = false;
};

void print_outcome(const Outcome& o, bool is_replay, bool json, const std::string& stream) {
  if (json) {
    nlohmann::json j{{"stream", stream},
                     {is_replay ? "replayed" : "purged", o.done.size()},
                     {"failed", o.failed.size()},
                     {"failed_seqs", o.failed},
                     {"interrupted", o.interrupted}};
    if (is_replay) {
      j["duplicates"] = o.duplicates;
      j["replayed_not_removed"] = o.not_removed;
      j["unacknowledged"] = o.uncertain;
    }
    std::cout << json_text(j) << "\n";
    return;
  }
  std::printf("%zu %s, %zu failed\n", o.done.size(), is_replay ? "replayed" : "purged", o.failed.size());
  if (!o.duplicates.empty())
    std::printf("%zu not replayed because the stream already held their replay id (duplicate); kept in %s\n",
                o.duplicates.size(), stream.c_str());
  if (!o.not_removed.empty()) {
    std::printf("%zu replayed but still in %s (delete failed): sequences", o.not_removed.size(), stream.c_str());
    for (auto s : o.not_removed) std::printf(" %llu", static_cast<unsigned long long>(s));
    std::printf("\n");
  }
  if (!o.uncertain.empty()) {
    std::printf("%zu never acknowledged (they may have been replayed; kept in %s): sequences", o.uncertain.size(),
                stream.c_str());
    for (auto s : o.uncertain) std::printf(" %llu", static_cast<unsigned long long>(s));
    std::printf("\n");
  }
  if (o.interrupted) std::printf("interrupted: the rest were left in %s untouched\n", stream.c_str());
}

struct ReplayOptions {
  bool to_subject = false;
  std::string replay_id;
};

Outcome replay(Connection& nats, const Config& config, const Sources& sources, const std::vector<DlqEntry>& targets,
               const ReplayOptions& options) {
  Outcome o;
  Publisher publisher(nats);
  ReplayRoutes routes(nats, config);
  Progress progress("replaying");
  size_t handled = 0;
  for (size_t start = 0; start < targets.size() && !g_interrupted.load(); start += kReplayWindow) {
    const size_t end = std::min(targets.size(), start + kReplayWindow);
    std::vector<RawMessage> batch;
    std::vector<const DlqEntry*> sent;
    for (size_t i = start; i < end; ++i) {
      const auto& e = targets[i];
      const auto& l = *e.letter;
      try {
        RawMessage m;
        m.payload = l.body;
        m.headers = l.headers;
        if (l.context.body_omitted && l.body.empty()) {
          // Never publish a body we do not have: the original is read back from its stream.
          auto original = read_original(nats, l);
          m.payload = std::move(original.body);
          m.headers = std::move(original.headers);
        }
        const auto original_id = m.headers.find("Nats-Msg-Id");
        const std::string original_msg_id = original_id == m.headers.end() ? std::string() : original_id->second;
        for (const char* h : {"Nats-Msg-Id", kOriginalMsgIdHeader, kReplayedFromHeader, kReplayOriginalSubjectHeader,
                              kReplayOriginalStreamHeader, kReplayOriginalSequenceHeader})
          m.headers.erase(h);
        if (!original_msg_id.empty()) m.headers[kOriginalMsgIdHeader] = original_msg_id;
        m.headers[kReplayedFromHeader] = e.stream + ":" + std::to_string(e.seq);
        if (options.to_subject) {
          // A plain republish: it is the original from now on (its own Nats-Msg-Id, stream and
          // sequence), so it carries no pointer back to the first one.
          m.subject = l.original_subject;
          m.headers.erase(kOriginalMsgIdHeader);
        } else {
          m.subject = routes.subject_for(l.context.stream, l.context.consumer);
          m.headers[kReplayOriginalSubjectHeader] = l.original_subject;
          if (!l.context.stream.empty() && l.context.sequence != 0) {
            m.headers[kReplayOriginalStreamHeader] = l.context.stream;
            m.headers[kReplayOriginalSequenceHeader] = std::to_string(l.context.sequence);
          }
        }
        // The body keeps the envelope's event_id (the inbox recognises the event); the Nats-Msg-Id
        // is new and random (122 bits), so it collides with nothing inside the duplicate window.
        m.msg_id = options.replay_id.empty() ? "replay-" + new_uuid() : options.replay_id;
        batch.push_back(std::move(m));
        sent.push_back(&e);
      } catch (const DlqFormatError& err) {
        o.failed.push_back(e.seq);
        spdlog::error("sequence {}: not replayed, kept: {}", e.seq, err.what());
      }
    }
    auto results = publisher.publish_raw_batch(batch, {.window = static_cast<int>(kReplayWindow)});
    // A publish without an answer (a stalled server, a lost connection) may still have been
    // stored. The same message with the same Nats-Msg-Id again finds out: JetStream answers
    // `duplicate` for one it holds. The id is ours alone (random, or --replay-id checked by the
    // first answer), so a duplicate on a second try is our own first try.
    std::vector<bool> retried(results.size(), false);
    for (int round = 0; round < kUnansweredRetries; ++round) {
      std::vector<size_t> again;
      for (size_t i = 0; i < results.size(); ++i)
        if (!results[i] && results[i].error->retryable) again.push_back(i);
      if (again.empty()) break;
      spdlog::warn("{} replay(s) not acknowledged ({}); asking again with the same ids", again.size(),
                   results[again.front()].error->message);
      std::vector<RawMessage> resend;
      for (auto i : again) resend.push_back(batch[i]);
      auto second = publisher.publish_raw_batch(resend, {.window = static_cast<int>(kReplayWindow)});
      for (size_t k = 0; k < again.size(); ++k) {
        results[again[k]] = std::move(second[k]);
        retried[again[k]] = true;
      }
    }
    for (size_t i = 0; i < results.size(); ++i) {
      const auto& r = results[i];
      const auto seq = sent[i]->seq;
      if (!r) {
        o.failed.push_back(seq);
        if (r.error->retryable && r.error->status != NATS_NO_RESPONDERS) {
          o.uncertain.push_back(seq);
          spdlog::error("sequence {}: never acknowledged ({}); it may have been replayed; kept", seq, r.error->message);
        } else {
          spdlog::error("sequence {}: not replayed, kept: {}", seq, r.error->message);
        }
        continue;
      }
      if (r.duplicate && !retried[i]) {
        // JetStream dropped it: nothing new was stored, so the letter must stay.
        o.failed.push_back(seq);
        o.duplicates.push_back(seq);
        spdlog::error("sequence {}: not replayed, kept: {} already holds replay id {} (duplicate)", seq, r.stream,
                      batch[i].msg_id);
        continue;
      }
      const auto& source = sources.named(sent[i]->stream);
      try {
        source.remove(seq);  // only after the replay was stored
        o.done.push_back(seq);
      } catch (const std::exception& err) {
        // A delete whose answer was lost may have been carried out: look before saying it was not.
        try {
          if (!source.get(seq)) {
            o.done.push_back(seq);
            continue;
          }
        } catch (const std::exception&) {
        }
        o.not_removed.push_back(seq);
        spdlog::error("sequence {}: replayed to {} (sequence {}) but still in {}: {}; purge it or it may be replayed twice",
                      seq, r.stream, r.sequence, sent[i]->stream, err.what());
      }
    }
    handled = end;
    progress.step(handled, targets.size());
  }
  o.interrupted = handled < targets.size();
  return o;
}

Outcome purge(const Sources& sources, const std::vector<DlqEntry>& targets) {
  Outcome o;
  Progress progress("purging");
  size_t handled = 0;
  for (const auto& e : targets) {
    if (g_interrupted.load()) break;
    try {
      sources.named(e.stream).remove(e.seq);
      o.done.push_back(e.seq);
    } catch (const std::exception& err) {
      o.failed.push_back(e.seq);
      spdlog::error("{}", err.what());
    }
    progress.step(++handled, targets.size());
  }
  o.interrupted = handled < targets.size();
  return o;
}

void show_entry(const DlqEntry& e, bool json) {
  const auto& stream = e.stream;
  const auto& l = *e.letter;
  auto parsed = nlohmann::json::parse(l.body, nullptr, false);
  if (json) {
    nlohmann::json j{{"stream", stream},           {"seq", e.seq},         {"subject", e.subject},
                     {"format", to_string(e.format)}, {"headers", l.headers}, {"context", l.context.to_json()},
                     {"body", l.body}};
    if (!parsed.is_discarded()) j["body_json"] = parsed;
    std::cout << json_text(j) << "\n";
    return;
  }
  std::cout << "DLQ stream:   " << stream << "\nDLQ sequence: " << e.seq << "\nDLQ subject:  " << e.subject
            << "\nFormat:       " << to_string(e.format) << "\n\nHeaders:\n";
  // Control characters from a hostile producer are not sent to the operator's terminal.
  auto printable = [](std::string s) {
    for (auto& c : s)
      if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
    return s;
  };
  for (const auto& [k, v] : l.headers) std::cout << "  " << printable(k) << ": " << printable(v) << "\n";
  std::cout << "\nContext:\n" << l.context.to_json().dump(2, ' ', false, nlohmann::json::error_handler_t::replace)
            << "\n\nBody:\n";
  if (l.context.body_omitted && l.body.empty())
    std::cout << "(left out of the dead letter; the original is " << l.context.stream << " sequence "
              << l.context.sequence << ")\n";
  else
    std::cout << (parsed.is_discarded() ? l.body : parsed.dump(2, ' ', false, nlohmann::json::error_handler_t::replace))
              << "\n";
}

int outbox_command(const std::string& database_url, bool list_parsed, bool json, size_t limit, bool all,
                   const std::vector<int64_t>& ids) {
  if (refuse_postgres_without_support(database_url, "natspubsub-dlq")) return kExitUsage;
  std::unique_ptr<store::Database> db;
  try {
    // An operator's tool must not create a database: a mistyped SQLite path is an error.
    auto url = store::DatabaseUrl::parse(database_url);
    if (url.backend() == store::Backend::sqlite && !std::filesystem::exists(url.path()))
      throw store::DatabaseError("SQLite database " + url.path() + " does not exist (natspubsub-dlq never creates one)");
    db = store::open_database(database_url);
  } catch (const std::exception& e) {
    spdlog::error("database: {}", e.what());
    return kExitDatabase;
  }
  auto store = make_outbox_store(*db);
  if (list_parsed) {
    auto rows = store->list_failed(limit);
    if (!json) std::printf("%-8s %-36s %-8s %-40s %s\n", "ID", "EVENT_ID", "ATTEMPTS", "SUBJECT", "LAST_ERROR");
    for (const auto& r : rows) {
      if (json) {
        std::cout << json_text({{"id", r.id}, {"event_id", r.event_id}, {"subject", r.subject},
                                {"attempts", r.attempts}, {"last_error", r.last_error.value_or("")},
                                {"created_at", format_timestamp(r.created_at)}})
                  << "\n";
      } else {
        std::printf("%-8lld %-36s %-8d %-40s %s\n", static_cast<long long>(r.id), r.event_id.c_str(), r.attempts,
                    short_text(r.subject, 40).c_str(), short_text(r.last_error.value_or(""), 60).c_str());
      }
    }
    if (!json) std::fprintf(stderr, "%zu failed row(s)\n", rows.size());
    return kExitOk;
  }
  if (!all && ids.empty()) throw UsageError("outbox retry: give row ids or --all");
  auto n = all ? store->retry_all_failed() : store->retry_failed(ids);
  if (json)
    std::cout << json_text({{"pending_again", n}}) << "\n";
  else
    std::printf("%zu row(s) pending again\n", n);
  return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App cli{"natspubsub-dlq: inspect and replay dead letters, retry failed outbox rows", "natspubsub-dlq"};
  // Global flags may also follow the subcommand: `natspubsub-dlq list --app payments`.
  cli.fallthrough();
  cli.require_subcommand(1);
  NatsFlags nats_flags;
  nats_flags.add_to(cli);
  std::string log_format = "text";
  std::string log_level = "warn";
  bool json = false;
  cli.add_option("--log-format", log_format, "text or json")->check(CLI::IsMember({"text", "json"}));
  cli.add_option("--log-level", log_level, "trace, debug, info, warn (default), error or off")
      ->envname("NATSPUBSUB_LOG_LEVEL")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "critical", "off"}));
  cli.add_flag("--json", json, "machine-readable output: one JSON object per line");
  cli.set_version_flag("--version", std::string("natspubsub-dlq ") + std::string(natspubsub::version()));

  Filters filters;
  bool dry_run = false, yes = false, all = false;
  ReplayOptions replay_options;
  auto add_filters = [&](CLI::App* sub) {
    sub->add_option("--topic", filters.topic, "only this topic (e.g. order.created)");
    sub->add_option("--reason", filters.reason,
                    "only this reason: malformed, permanent_error, attempts_exhausted, max_deliveries, or any other "
                    "written by another producer");
    sub->add_option("--since", filters.since, "only dead letters newer than 90s, 15m, 2h, 3d, 1w or an RFC 3339 time");
    sub->add_option("--limit", filters.limit, "at most this many");
  };
  auto* list = cli.add_subcommand("list", "list dead letters (oldest first)");
  add_filters(list);
  std::string show_id;
  auto* show = cli.add_subcommand("show", "show one dead letter: headers, context, body");
  show->add_option("id", show_id, "DLQ sequence (SEQ or STREAM:SEQ) or event id")->required();
  std::vector<std::string> seqs;
  auto* replay_cmd = cli.add_subcommand("replay", "send dead letters back to the consumer that failed on them");
  replay_cmd->add_option("seq", seqs, "DLQ sequences (SEQ, or STREAM:SEQ for another DLQ stream of the app)");
  replay_cmd->add_flag("--all", all, "every dead letter matching the filters");
  add_filters(replay_cmd);
  replay_cmd->add_flag("--dry-run", dry_run, "show what would be replayed");
  replay_cmd->add_flag("--yes,-y", yes, "do not ask for confirmation");
  replay_cmd->add_flag("--to-subject", replay_options.to_subject,
                       "publish to the original subject instead: every consumer of it gets the event again");
  replay_cmd->add_option("--replay-id", replay_options.replay_id,
                         "Nats-Msg-Id of the replay (one sequence only); the same id again inside the duplicate "
                         "window is not replayed twice (default: a new random id)");
  auto* purge_cmd = cli.add_subcommand("purge", "delete dead letters");
  purge_cmd->add_option("seq", seqs, "DLQ sequences (SEQ, or STREAM:SEQ)");
  purge_cmd->add_flag("--all", all, "every dead letter matching the filters");
  add_filters(purge_cmd);
  purge_cmd->add_flag("--yes,-y", yes, "do not ask for confirmation");
  auto* stats = cli.add_subcommand("stats", "counts by topic and reason");
  std::string database_url;
  std::vector<int64_t> outbox_ids;
  auto* outbox = cli.add_subcommand("outbox", "failed outbox rows");
  outbox->require_subcommand(1);
  outbox->add_option("--database", database_url, "the outbox database URL")
      ->envname("NATSPUBSUB_DATABASE_URL")
      ->required();
  auto* outbox_list = outbox->add_subcommand("list", "list failed rows");
  size_t outbox_limit = 100;
  outbox_list->add_option("--limit", outbox_limit, "at most this many")->capture_default_str();
  auto* outbox_retry = outbox->add_subcommand("retry", "make failed rows pending again");
  outbox_retry->add_option("id", outbox_ids, "outbox row ids");
  outbox_retry->add_flag("--all", all, "every failed row");

  try {
    cli.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = cli.exit(e);
    return rc == 0 ? kExitOk : kExitUsage;
  }
  setup_logging(log_format, "natspubsub-dlq");
  const auto level = spdlog::level::from_str(log_level);
  spdlog::set_level(level);
  natspubsub::logger()->set_level(level);

  try {
    if (!filters.since.empty()) filters.since_time = parse_since(filters.since);
    if (!replay_options.replay_id.empty() && (all || seqs.size() != 1))
      throw UsageError("--replay-id: give exactly one sequence (a replay id names one replay)");
    if (outbox->parsed())
      return outbox_command(database_url, outbox_list->parsed(), json, outbox_limit, all, outbox_ids);
    if ((replay_cmd->parsed() || purge_cmd->parsed()) && !all && seqs.empty())
      throw UsageError("give DLQ sequences or --all");

    Config config;
    try {
      config = nats_flags.build();
    } catch (const Error& e) {
      spdlog::error("{}", e.what());
      return kExitConfig;
    }
    std::optional<Connection> nats;
    try {
      nats.emplace(config);
    } catch (const std::exception& e) {
      spdlog::error("NATS: {}", e.what());
      return kExitNats;
    }
    std::optional<Sources> found;
    try {
      found.emplace(DeadLetterStream::locate_all(*nats, config));
    } catch (const DlqStreamMissing& e) {
      spdlog::error("{}", e.what());
      return kExitConfig;
    }
    const auto& sources = *found;

    if (list->parsed()) {
      size_t not_letters = 0;
      auto entries = collect(sources, filters, &not_letters);
      if (!json)
        std::printf("%-6s %-24s %-18s %-4s %-30s %-36s %s\n", "SEQ", "DEAD_LETTERED_AT", "REASON", "DLV", "TOPIC",
                    "EVENT_ID", "ERROR");
      for (const auto& e : entries) {
        if (json) {
          std::cout << json_text(entry_json(e)) << "\n";
          continue;
        }
        const auto& c = e.letter->context;
        std::printf("%-6s %-24s %-18s %-4llu %-30s %-36s %s\n", sources.label(e).c_str(),
                    format_timestamp(c.published_at).c_str(), short_text(c.reason_text(), 18).c_str(),
                    static_cast<unsigned long long>(c.deliveries), short_text(e.topic, 30).c_str(),
                    c.event_id.c_str(), short_text(c.error_message, 60).c_str());
      }
      if (!json) {
        std::fprintf(stderr, "%zu dead letter(s) in %s\n", entries.size(), sources.names().c_str());
        if (not_letters > 0)
          std::fprintf(stderr, "%zu message(s) in %s are not dead letters (skipped; `show SEQ` says why)\n",
                       not_letters, sources.names().c_str());
      }
      return kExitOk;
    }

    if (show->parsed()) {
      auto e = find(sources, show_id);
      if (!e) {
        std::cerr << "no dead letter " << show_id << " in " << sources.names() << "\n";
        return kExitFailure;
      }
      if (!e->letter) {
        std::cerr << e->stream << " sequence " << e->seq << " is not a dead letter: " << e->problem << "\n";
        return kExitFailure;
      }
      show_entry(*e, json);
      return kExitOk;
    }

    if (replay_cmd->parsed() || purge_cmd->parsed()) {
      const bool is_replay = replay_cmd->parsed();
      std::vector<DlqEntry> targets;
      if (all) {
        targets = collect(sources, filters);
      } else {
        for (const auto& s : seqs) {
          auto e = sources.get(s);
          if (!e) {
            std::cerr << "no dead letter at sequence " << s << " in " << sources.names() << "\n";
            return kExitFailure;
          }
          if (!e->letter && is_replay) {
            std::cerr << e->stream << " sequence " << e->seq << " is not a dead letter: " << e->problem << "\n";
            return kExitFailure;
          }
          targets.push_back(std::move(*e));
        }
      }
      {
        // A sequence given twice is one letter: replayed (or purged) once.
        std::set<std::pair<std::string, uint64_t>> seen;
        std::erase_if(targets, [&](const DlqEntry& e) { return !seen.emplace(e.stream, e.seq).second; });
      }
      if (targets.empty()) {
        if (json)
          print_outcome({}, is_replay, true, sources.names());
        else
          std::fprintf(stderr, "nothing matches\n");
        return kExitOk;
      }
      if (is_replay && dry_run) {
        for (const auto& e : targets) {
          const auto& l = *e.letter;
          const std::string to = replay_options.to_subject ? l.original_subject
                                                           : "consumer " + l.context.consumer + " (replay route)";
          if (json)
            std::cout << json_text({{"seq", e.seq}, {"dlq_stream", e.stream}, {"event_id", l.context.event_id}, {"to", to}}) << "\n";
          else
            std::printf("would replay seq %s %s -> %s\n", sources.label(e).c_str(), l.context.event_id.c_str(),
                        to.c_str());
        }
        std::fprintf(stderr, "%zu dead letter(s) would be replayed (dry run)\n", targets.size());
        return kExitOk;
      }
      std::string question = std::string(is_replay ? "Replay " : "Delete ") + std::to_string(targets.size()) +
                             " dead letter(s) from " + sources.names() + "?";
      if (!confirm(question, yes)) return kExitFailure;

      // From here an interrupt finishes what is in hand (the window of replays, or one delete).
      // SIGHUP too: an operator's SSH session that drops must not kill the tool between a window's
      // replays and their deletes.
      std::signal(SIGINT, on_interrupt);
      std::signal(SIGTERM, on_interrupt);
      std::signal(SIGHUP, on_interrupt);
      auto outcome = is_replay ? replay(*nats, config, sources, targets, replay_options) : purge(sources, targets);
      print_outcome(outcome, is_replay, json, sources.names());
      if (outcome.interrupted) return kExitInterrupted;
      return outcome.failed.empty() && outcome.not_removed.empty() ? kExitOk : kExitFailure;
    }

    if (stats->parsed()) {
      auto entries = collect(sources, {});
      std::map<std::string, std::map<std::string, size_t>> by_topic;
      std::map<std::string, size_t> by_reason;
      for (const auto& e : entries) {
        by_topic[e.topic][e.letter->context.reason_text()]++;
        by_reason[e.letter->context.reason_text()]++;
      }
      if (json) {
        std::map<std::string, size_t> by_stream;
        for (const auto& e : entries) by_stream[e.stream]++;
        nlohmann::json j{{"stream", sources.primary().name()}, {"by_stream", by_stream}, {"total", entries.size()},
                         {"by_reason", by_reason}, {"by_topic", by_topic}};
        std::cout << json_text(j) << "\n";
      } else {
        std::printf("%s: %zu dead letter(s)\n\n%-30s %-18s %s\n", sources.names().c_str(), entries.size(), "TOPIC",
                    "REASON", "COUNT");
        for (const auto& [topic, reasons] : by_topic)
          for (const auto& [reason, n] : reasons) std::printf("%-30s %-18s %zu\n", topic.c_str(), reason.c_str(), n);
      }
      return kExitOk;
    }
  } catch (const UsageError& e) {
    std::cerr << "natspubsub-dlq: " << e.what() << "\n";
    return kExitUsage;
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    return kExitFailure;
  }
  return kExitOk;
}
