// natspubsub-dlq: list, show, replay, purge and count dead letters; list and retry failed
// outbox rows. See README "Operations".
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <map>
#include <optional>

#include <nats/nats.h>
#include <spdlog/spdlog.h>

#include <natspubsub/connection.hpp>
#include <natspubsub/dlq.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/outbox.hpp>
#include <natspubsub/store/database.hpp>
#include <natspubsub/topology.hpp>
#include <natspubsub/version.hpp>

#include "common.hpp"

using namespace natspubsub;
using namespace natspubsub::workers;

namespace {

struct Filters {
  std::string topic;
  std::string reason;
  std::string since;
  size_t limit = 0;  // 0: no limit
  std::optional<SystemTime> since_time;
};

struct Entry {
  uint64_t seq = 0;
  std::string subject;  // the DLQ subject
  DeadLetter letter;
  std::string topic;
};

// "90s", "15m", "2h", "3d" back from now, or an RFC 3339 time.
SystemTime parse_since(const std::string& text) {
  if (!text.empty() && std::isdigit(static_cast<unsigned char>(text.front())) &&
      std::string("smhd").find(text.back()) != std::string::npos && text.find('-') == std::string::npos) {
    long long n = std::stoll(text.substr(0, text.size() - 1));
    long long unit = text.back() == 's' ? 1 : text.back() == 'm' ? 60 : text.back() == 'h' ? 3600 : 86400;
    return now_ms() - std::chrono::seconds(n * unit);
  }
  return parse_timestamp(text, "--since");
}

std::string topic_of(const DeadLetter& l, const Config& config) {
  if (auto it = l.headers.find("topic"); it != l.headers.end()) return it->second;
  // Subject {env}.{app}.{topic}: drop the first two tokens.
  auto s = l.original_subject;
  auto first = s.find('.');
  auto second = first == std::string::npos ? first : s.find('.', first + 1);
  (void)config;
  return second == std::string::npos ? s : s.substr(second + 1);
}

Headers headers_of(natsMsg* msg) {
  Headers h;
  const char** keys = nullptr;
  int count = 0;
  if (natsMsgHeader_Keys(msg, &keys, &count) == NATS_OK) {
    for (int i = 0; i < count; ++i) {
      const char* v = nullptr;
      if (natsMsgHeader_Get(msg, keys[i], &v) == NATS_OK && v != nullptr) h[keys[i]] = v;
    }
    free(static_cast<void*>(keys));
  }
  return h;
}

class DlqReader {
 public:
  DlqReader(Connection& nats, const Config& config) : nats_(nats), config_(config), stream_(config.dlq_stream_name()) {}

  const std::string& stream() const { return stream_; }

  std::optional<Entry> get(uint64_t seq) {
    natsMsg* msg = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    natsStatus s = js_GetMsg(&msg, nats_.jetstream(), stream_.c_str(), seq, nullptr, &jerr);
    if (s != NATS_OK) return std::nullopt;  // deleted or beyond the end
    Entry e;
    e.seq = seq;
    e.subject = natsMsg_GetSubject(msg);
    std::string body(natsMsg_GetData(msg), static_cast<size_t>(natsMsg_GetDataLength(msg)));
    auto headers = headers_of(msg);
    natsMsg_Destroy(msg);
    try {
      e.letter = parse_dead_letter(e.subject, body, headers);
    } catch (const DlqFormatError& err) {
      spdlog::warn("DLQ sequence {} is not a natspubsub dead letter: {}", seq, err.what());
      return std::nullopt;
    }
    e.topic = topic_of(e.letter, config_);
    return e;
  }

  /// Every dead letter matching the filters, oldest first.
  std::vector<Entry> scan(const Filters& f) {
    std::vector<Entry> out;
    StreamSummary info;
    try {
      info = Topology(nats_).stream_info(stream_);
    } catch (const NatsError& e) {
      if (e.js_error_code() == 10059) return out;  // no DLQ stream yet: nothing dead-lettered
      throw;
    }
    for (uint64_t seq = info.first_sequence; seq != 0 && seq <= info.last_sequence; ++seq) {
      auto e = get(seq);
      if (!e) continue;
      if (!f.topic.empty() && e->topic != f.topic) continue;
      if (!f.reason.empty() && to_string(e->letter.context.reason) != f.reason) continue;
      if (f.since_time && e->letter.context.published_at < *f.since_time) continue;
      out.push_back(std::move(*e));
      if (f.limit > 0 && out.size() >= f.limit) break;
    }
    return out;
  }

  /// Finds by stream sequence (all digits) or by event id.
  std::optional<Entry> find(const std::string& id) {
    if (!id.empty() && std::all_of(id.begin(), id.end(), ::isdigit)) return get(std::stoull(id));
    for (auto& e : scan({})) {
      if (e.letter.context.event_id == id) return std::move(e);
    }
    return std::nullopt;
  }

  void remove(uint64_t seq) {
    jsErrCode jerr = static_cast<jsErrCode>(0);
    natsStatus s = js_DeleteMsg(nats_.jetstream(), stream_.c_str(), seq, nullptr, &jerr);
    if (s != NATS_OK) throw NatsError("deleting DLQ sequence " + std::to_string(seq) + " failed", s, jerr);
  }

 private:
  Connection& nats_;
  const Config& config_;
  std::string stream_;
};

std::string short_text(std::string s, size_t n) {
  for (auto& c : s)
    if (c == '\n' || c == '\r' || c == '\t') c = ' ';
  return s.size() <= n ? s : s.substr(0, n - 1) + "~";
}

nlohmann::json entry_json(const Entry& e) {
  return {{"seq", e.seq},
          {"subject", e.letter.original_subject},
          {"topic", e.topic},
          {"event_id", e.letter.context.event_id},
          {"reason", to_string(e.letter.context.reason)},
          {"deliveries", e.letter.context.deliveries},
          {"error_class", e.letter.context.error_class},
          {"error_message", e.letter.context.error_message},
          {"consumer", e.letter.context.consumer},
          {"dead_lettered_at", format_timestamp(e.letter.context.published_at)}};
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

class Progress {
 public:
  Progress(size_t total, const char* verb) : total_(total), verb_(verb), enabled_(isatty(STDERR_FILENO) && total >= 50) {}
  void step(size_t done) {
    if (!enabled_) return;
    const int width = 30;
    int filled = static_cast<int>(width * done / std::max<size_t>(1, total_));
    std::fprintf(stderr, "\r%s [%.*s%*s] %zu/%zu", verb_, filled, "==============================", width - filled, "",
                 done, total_);
    if (done == total_) std::fprintf(stderr, "\n");
  }

 private:
  size_t total_;
  const char* verb_;
  bool enabled_;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App cli{"natspubsub-dlq: inspect and replay dead letters, retry failed outbox rows", "natspubsub-dlq"};
  cli.require_subcommand(1);
  NatsFlags nats_flags;
  nats_flags.add_to(cli);
  std::string log_format = "text";
  cli.add_option("--log-format", log_format, "text or json")->check(CLI::IsMember({"text", "json"}));
  cli.set_version_flag("--version", std::string("natspubsub-dlq ") + std::string(natspubsub::version()));

  Filters filters;
  bool json = false, dry_run = false, yes = false, all = false;
  auto add_filters = [&](CLI::App* sub) {
    sub->add_option("--topic", filters.topic, "only this topic (e.g. order.created)");
    sub->add_option("--reason", filters.reason, "malformed, permanent_error, attempts_exhausted or max_deliveries")
        ->check(CLI::IsMember({"malformed", "permanent_error", "attempts_exhausted", "max_deliveries"}));
    sub->add_option("--since", filters.since, "only dead letters newer than 30m, 2h, 1d or an RFC 3339 time");
    sub->add_option("--limit", filters.limit, "at most this many");
  };
  auto* list = cli.add_subcommand("list", "list dead letters (oldest first)");
  add_filters(list);
  list->add_flag("--json", json, "one JSON object per line");
  std::string show_id;
  auto* show = cli.add_subcommand("show", "show one dead letter: headers, context, body");
  show->add_option("id", show_id, "DLQ sequence or event id")->required();
  std::vector<uint64_t> seqs;
  auto* replay = cli.add_subcommand("replay", "republish dead letters to their original subject");
  replay->add_option("seq", seqs, "DLQ sequences");
  replay->add_flag("--all", all, "every dead letter matching the filters");
  add_filters(replay);
  replay->add_flag("--dry-run", dry_run, "show what would be replayed");
  replay->add_flag("--yes,-y", yes, "do not ask for confirmation");
  auto* purge = cli.add_subcommand("purge", "delete dead letters");
  purge->add_option("seq", seqs, "DLQ sequences");
  purge->add_flag("--all", all, "every dead letter matching the filters");
  add_filters(purge);
  purge->add_flag("--yes,-y", yes, "do not ask for confirmation");
  auto* stats = cli.add_subcommand("stats", "counts by topic and reason");
  stats->add_flag("--json", json, "JSON output");
  std::string database_url;
  std::vector<int64_t> outbox_ids;
  auto* outbox = cli.add_subcommand("outbox", "failed outbox rows");
  outbox->require_subcommand(1);
  outbox->add_option("--database", database_url, "the outbox database URL")
      ->envname("NATSPUBSUB_DATABASE_URL")
      ->required();
  auto* outbox_list = outbox->add_subcommand("list", "list failed rows");
  outbox_list->add_flag("--json", json, "one JSON object per line");
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

  try {
    if (outbox->parsed()) {
      std::unique_ptr<store::Database> db;
      try {
        db = store::open_database(database_url);
      } catch (const std::exception& e) {
        spdlog::error("database: {}", e.what());
        return kExitDatabase;
      }
      auto store = make_outbox_store(*db);
      if (outbox_list->parsed()) {
        auto rows = store->list_failed(outbox_limit);
        if (!json) std::printf("%-8s %-36s %-8s %-40s %s\n", "ID", "EVENT_ID", "ATTEMPTS", "SUBJECT", "LAST_ERROR");
        for (const auto& r : rows) {
          if (json) {
            std::cout << nlohmann::json{{"id", r.id}, {"event_id", r.event_id}, {"subject", r.subject},
                                        {"attempts", r.attempts}, {"last_error", r.last_error.value_or("")},
                                        {"created_at", format_timestamp(r.created_at)}}
                             .dump()
                      << "\n";
          } else {
            std::printf("%-8lld %-36s %-8d %-40s %s\n", static_cast<long long>(r.id), r.event_id.c_str(), r.attempts,
                        short_text(r.subject, 40).c_str(), short_text(r.last_error.value_or(""), 60).c_str());
          }
        }
        if (!json) std::fprintf(stderr, "%zu failed row(s)\n", rows.size());
      } else {
        if (!all && outbox_ids.empty()) {
          std::cerr << "outbox retry: give row ids or --all\n";
          return kExitUsage;
        }
        auto n = all ? store->retry_all_failed() : store->retry_failed(outbox_ids);
        std::printf("%zu row(s) pending again\n", n);
      }
      return kExitOk;
    }

    Config config;
    try {
      config = nats_flags.build();
    } catch (const Error& e) {
      spdlog::error("{}", e.what());
      return kExitConfig;
    }
    if (!filters.since.empty()) filters.since_time = parse_since(filters.since);

    std::optional<Connection> nats;
    try {
      nats.emplace(config);
    } catch (const std::exception& e) {
      spdlog::error("NATS: {}", e.what());
      return kExitNats;
    }
    DlqReader reader(*nats, config);

    if (list->parsed()) {
      auto entries = reader.scan(filters);
      if (!json)
        std::printf("%-6s %-24s %-18s %-4s %-30s %-36s %s\n", "SEQ", "DEAD_LETTERED_AT", "REASON", "DLV", "TOPIC",
                    "EVENT_ID", "ERROR");
      for (const auto& e : entries) {
        if (json) {
          std::cout << entry_json(e).dump() << "\n";
        } else {
          const auto& c = e.letter.context;
          std::printf("%-6llu %-24s %-18s %-4llu %-30s %-36s %s\n", static_cast<unsigned long long>(e.seq),
                      format_timestamp(c.published_at).c_str(), to_string(c.reason),
                      static_cast<unsigned long long>(c.deliveries), short_text(e.topic, 30).c_str(),
                      c.event_id.c_str(), short_text(c.error_message, 60).c_str());
        }
      }
      if (!json) std::fprintf(stderr, "%zu dead letter(s) in %s\n", entries.size(), reader.stream().c_str());
      return kExitOk;
    }

    if (show->parsed()) {
      auto e = reader.find(show_id);
      if (!e) {
        std::cerr << "no dead letter " << show_id << " in " << reader.stream() << "\n";
        return kExitFailure;
      }
      std::cout << "DLQ sequence: " << e->seq << "\nDLQ subject:  " << e->subject << "\n\nHeaders:\n";
      for (const auto& [k, v] : e->letter.headers) std::cout << "  " << k << ": " << v << "\n";
      std::cout << "\nContext:\n" << e->letter.context.to_json().dump(2) << "\n\nBody:\n";
      auto parsed = nlohmann::json::parse(e->letter.body, nullptr, false);
      std::cout << (parsed.is_discarded() ? e->letter.body : parsed.dump(2)) << "\n";
      return kExitOk;
    }

    if (replay->parsed() || purge->parsed()) {
      std::vector<Entry> targets;
      if (all) {
        targets = reader.scan(filters);
      } else {
        if (seqs.empty()) {
          std::cerr << "give DLQ sequences or --all\n";
          return kExitUsage;
        }
        for (auto s : seqs) {
          auto e = reader.get(s);
          if (!e) {
            std::cerr << "no dead letter at sequence " << s << " in " << reader.stream() << "\n";
            return kExitFailure;
          }
          targets.push_back(std::move(*e));
        }
      }
      if (targets.empty()) {
        std::fprintf(stderr, "nothing matches\n");
        return kExitOk;
      }
      const bool is_replay = replay->parsed();
      if (is_replay && dry_run) {
        for (const auto& e : targets)
          std::printf("would replay seq %llu %s -> %s\n", static_cast<unsigned long long>(e.seq),
                      e.letter.context.event_id.c_str(), e.letter.original_subject.c_str());
        std::fprintf(stderr, "%zu dead letter(s) would be replayed (dry run)\n", targets.size());
        return kExitOk;
      }
      std::string question = std::string(is_replay ? "Replay " : "Delete ") + std::to_string(targets.size()) +
                             " dead letter(s) from " + reader.stream() + "?";
      if (!confirm(question, yes)) return kExitFailure;

      Publisher publisher(*nats);
      Progress progress(targets.size(), is_replay ? "replaying" : "purging");
      size_t done = 0, failed = 0;
      for (const auto& e : targets) {
        try {
          if (is_replay) {
            // Same body (so the envelope's event_id, and the inbox, recognise the event), but a fresh
            // Nats-Msg-Id: JetStream would otherwise drop it as a duplicate inside its window.
            RawMessage m;
            m.subject = e.letter.original_subject;
            m.payload = e.letter.body;
            m.headers = e.letter.headers;
            m.headers.erase("Nats-Msg-Id");
            m.headers["x-replayed-from"] = reader.stream() + ":" + std::to_string(e.seq);
            m.msg_id = (e.letter.context.event_id.empty() ? std::string("event") : e.letter.context.event_id) +
                       "-replay-" + new_uuid().substr(0, 8);
            auto r = publisher.publish_raw_batch({m});
            if (!r[0]) throw PublishError("replay of seq " + std::to_string(e.seq) + ": " + r[0].error->message, r[0].error->status);
          }
          reader.remove(e.seq);  // only after the republish was acknowledged
          ++done;
        } catch (const std::exception& err) {
          ++failed;
          spdlog::error("{}", err.what());
        }
        progress.step(done + failed);
      }
      std::printf("%zu %s, %zu failed\n", done, is_replay ? "replayed" : "purged", failed);
      return failed == 0 ? kExitOk : kExitFailure;
    }

    if (stats->parsed()) {
      auto entries = reader.scan({});
      std::map<std::string, std::map<std::string, size_t>> by_topic;
      std::map<std::string, size_t> by_reason;
      for (const auto& e : entries) {
        by_topic[e.topic][to_string(e.letter.context.reason)]++;
        by_reason[to_string(e.letter.context.reason)]++;
      }
      if (json) {
        nlohmann::json j{{"stream", reader.stream()}, {"total", entries.size()}, {"by_reason", by_reason}, {"by_topic", by_topic}};
        std::cout << j.dump() << "\n";
      } else {
        std::printf("%s: %zu dead letter(s)\n\n%-30s %-18s %s\n", reader.stream().c_str(), entries.size(), "TOPIC",
                    "REASON", "COUNT");
        for (const auto& [topic, reasons] : by_topic)
          for (const auto& [reason, n] : reasons) std::printf("%-30s %-18s %zu\n", topic.c_str(), reason.c_str(), n);
      }
      return kExitOk;
    }
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    return kExitFailure;
  }
  return kExitOk;
}
