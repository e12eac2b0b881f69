#include <natspubsub/topology.hpp>

#include <algorithm>
#include <random>
#include <thread>

#include <natspubsub/connection.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/log.hpp>
#include <natspubsub/subject.hpp>

#include "nats_util.hpp"

namespace natspubsub {
namespace {

constexpr int64_t kNanosPerMilli = 1000000;
// How long after adding subjects to a stream we look whether a concurrent update replaced them:
// well above one JetStream API round trip, the time between another process's read and write.
constexpr Millis kSettleDelay{150};

int64_t to_nanos(Millis m) { return m.count() * kNanosPerMilli; }

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& i : items) out += (out.empty() ? "" : ", ") + i;
  return "[" + out + "]";
}

std::vector<std::string> subjects_of(const jsStreamConfig* cfg) {
  std::vector<std::string> out;
  for (int i = 0; cfg != nullptr && i < cfg->SubjectsLen; ++i) out.emplace_back(cfg->Subjects[i]);
  return out;
}

bool covered_by(const std::string& subject, const std::vector<std::string>& filters) {
  return std::any_of(filters.begin(), filters.end(), [&](const auto& f) { return subject::covers(f, subject); });
}

const char* retention_name(jsRetentionPolicy r) {
  switch (r) {
    case js_LimitsPolicy: return "limits";
    case js_InterestPolicy: return "interest";
    case js_WorkQueuePolicy: return "workqueue";
  }
  return "?";
}

jsRetentionPolicy to_cnats(Retention r) {
  switch (r) {
    case Retention::limits: return js_LimitsPolicy;
    case Retention::interest: return js_InterestPolicy;
    case Retention::work_queue: return js_WorkQueuePolicy;
  }
  return js_LimitsPolicy;
}

bool is_not_found(natsStatus s, jsErrCode code, jsErrCode expected) {
  return s == NATS_NOT_FOUND || code == expected;
}

}  // namespace

const char* to_string(EnsureAction action) noexcept {
  switch (action) {
    case EnsureAction::created: return "created";
    case EnsureAction::updated: return "updated";
    case EnsureAction::unchanged: return "unchanged";
    case EnsureAction::adopted: return "adopted";
    case EnsureAction::recreated: return "recreated";
  }
  return "unknown";
}

Topology::Topology(Connection& connection) : connection_(&connection) {}

StreamSpec Topology::events_stream_spec(const Config& config) {
  StreamSpec s;
  s.name = config.events_stream_name();
  s.subjects = {config.env + "." + config.app + ".>"};
  if (config.topology == TopologyMode::natspubsub) {
    // NatsPubsub creates its stream with both its event subjects and the topics of its app; an
    // app joining later adds its own "{env}.{app}.>" (ensure_stream extends an existing stream).
    s.subjects.insert(s.subjects.begin(), config.env + ".events.>");
  }
  s.memory_storage = config.stream.memory_storage;
  s.replicas = config.stream.replicas;
  s.duplicate_window = config.stream.duplicate_window;
  s.max_age = config.stream.max_age;
  s.max_bytes = config.stream.max_bytes;
  s.max_msgs = config.stream.max_msgs;
  s.description = config.topology == TopologyMode::natspubsub ? "events of " + config.env + " (NatsPubsub layout)"
                                                               : "events published by " + config.app + " (natspubsub)";
  return s;
}

StreamSpec Topology::dlq_stream_spec(const Config& config) {
  StreamSpec s;
  s.name = config.dlq_stream_name();
  s.subjects = {"dlq." + config.env + "." + config.app + ".>"};
  s.memory_storage = config.stream.memory_storage;
  s.replicas = config.stream.replicas;
  s.duplicate_window = config.stream.duplicate_window;
  s.description = "dead letters of " + config.app + " (natspubsub)";
  return s;
}

StreamSpec Topology::replay_stream_spec(const Config& config) {
  StreamSpec s;
  s.name = config.env + "-" + config.app + "-replay";
  s.subjects = {"replay." + config.env + "." + config.app + ".>"};
  // Work queue: a replay is removed once its consumer acked (or terminated) it; each replay
  // durable filters its own subject, so the filters never overlap, as work queues require.
  s.retention = Retention::work_queue;
  s.memory_storage = config.stream.memory_storage;
  s.replicas = config.stream.replicas;
  s.duplicate_window = config.stream.duplicate_window;
  s.description = "dead letters of " + config.app + " replayed to the consumer that failed (natspubsub)";
  return s;
}

std::string Topology::consumer_name(const Config& config, std::string_view filter_subject) {
  if (config.topology == TopologyMode::natspubsub) {
    // NatsPubsub's rule, character by character: "acc.orders.>" gives "{app}_acc_orders__".
    subject::validate_filter(filter_subject);
    std::string name = config.app + "_";
    for (char c : filter_subject) name += (c == '.' || c == '*' || c == '>') ? '_' : c;
    return name;
  }
  return config.env + "-" + config.app + "-" + subject::to_name(filter_subject);
}

ConsumerSpec Topology::consumer_spec(const Config& config, std::string filter_subject) {
  subject::validate_filter(filter_subject);
  ConsumerSpec c;
  c.durable = consumer_name(config, filter_subject);
  c.filter_subject = std::move(filter_subject);
  c.ack_wait = config.consumer.ack_wait;
  // Unlimited: the runtime counts attempts from the delivery count and dead-letters a message
  // past max_attempts itself, so the server must never give up on a message first (a DLQ outage
  // would leave it acknowledged by nobody). An existing durable is updated to this in place.
  c.max_deliver = -1;
  c.max_ack_pending = config.consumer.max_ack_pending;
  c.description = "natspubsub durable of " + config.app;
  c.adopt_existing = config.topology == TopologyMode::natspubsub;
  return c;
}

std::vector<StreamSummary> Topology::streams() const {
  jsStreamInfoList* list = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_Streams(&list, connection_->jetstream(), nullptr, &jerr);
  std::vector<StreamSummary> out;
  if (s == NATS_NOT_FOUND) return out;  // cnats reports an empty list as not found
  detail::check(s, "listing streams", jerr);
  for (int i = 0; i < list->Count; ++i) {
    const jsStreamInfo* si = list->List[i];
    StreamSummary sum;
    sum.name = si->Config->Name;
    sum.subjects = subjects_of(si->Config);
    sum.messages = si->State.Msgs;
    sum.first_sequence = si->State.FirstSeq;
    sum.last_sequence = si->State.LastSeq;
    sum.replicas = static_cast<int>(si->Config->Replicas);
    out.push_back(std::move(sum));
  }
  jsStreamInfoList_Destroy(list);
  return out;
}

StreamSummary Topology::stream_info(const std::string& name) const {
  jsStreamInfo* raw = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_GetStreamInfo(&raw, connection_->jetstream(), name.c_str(), nullptr, &jerr);
  detail::StreamInfoPtr si(raw);
  detail::check(s, "reading stream " + name, jerr);
  StreamSummary sum;
  sum.name = si->Config->Name;
  sum.subjects = subjects_of(si->Config);
  sum.messages = si->State.Msgs;
  sum.first_sequence = si->State.FirstSeq;
  sum.last_sequence = si->State.LastSeq;
  sum.replicas = static_cast<int>(si->Config->Replicas);
  return sum;
}

std::optional<std::string> Topology::stream_for(std::string_view filter) const {
  for (const auto& s : streams()) {
    if (covered_by(std::string(filter), s.subjects)) return s.name;
  }
  return std::nullopt;
}

StreamResult Topology::ensure_stream(const StreamSpec& spec) { return ensure_stream(spec, 5); }

StreamResult Topology::ensure_stream(const StreamSpec& spec, int retries_left) {
  subject::validate_token(spec.name, "stream name");
  if (spec.subjects.empty()) throw TopologyError("stream " + spec.name + ": at least one subject is required");
  for (const auto& s : spec.subjects) subject::validate_filter(s);

  auto all = streams();
  auto existing = std::find_if(all.begin(), all.end(), [&](const auto& s) { return s.name == spec.name; });

  auto guard = [&](const std::vector<std::string>& wanted) {
    for (const auto& other : all) {
      if (other.name == spec.name) continue;
      for (const auto& ours : wanted) {
        for (const auto& theirs : other.subjects) {
          if (subject::overlaps(ours, theirs)) {
            throw OverlapError("stream " + spec.name + " subject " + ours + " overlaps stream " + other.name +
                                   " subject " + theirs + " (subjects of " + other.name + ": " +
                                   join(other.subjects) + ")",
                               spec.name, other.name);
          }
        }
      }
    }
  };

  StreamResult result;
  result.stream = spec.name;

  if (existing == all.end()) {
    // Adopt a stream that already captures everything (e.g. NatsPubsub JS "{env}-events-stream").
    for (const auto& other : all) {
      bool captures_all = std::all_of(spec.subjects.begin(), spec.subjects.end(),
                                      [&](const auto& s) { return covered_by(s, other.subjects); });
      if (captures_all) {
        logger()->info("stream {}: adopting existing stream {} which captures {}", spec.name, other.name,
                       join(spec.subjects));
        result.action = EnsureAction::adopted;
        result.stream = other.name;
        result.subjects = other.subjects;
        return result;
      }
    }
    guard(spec.subjects);

    std::vector<const char*> subjects;
    for (const auto& s : spec.subjects) subjects.push_back(s.c_str());
    jsStreamConfig cfg;
    jsStreamConfig_Init(&cfg);
    cfg.Name = spec.name.c_str();
    cfg.Description = spec.description.empty() ? nullptr : spec.description.c_str();
    cfg.Subjects = subjects.data();
    cfg.SubjectsLen = static_cast<int>(subjects.size());
    cfg.Retention = to_cnats(spec.retention);
    cfg.Storage = spec.memory_storage ? js_MemoryStorage : js_FileStorage;
    cfg.Replicas = spec.replicas;
    cfg.Duplicates = to_nanos(spec.duplicate_window);
    cfg.MaxAge = to_nanos(spec.max_age);
    cfg.MaxBytes = spec.max_bytes;
    cfg.MaxMsgs = spec.max_msgs;
    cfg.MaxMsgSize = spec.max_msg_size;
    cfg.AllowDirect = true;
    jsStreamInfo* raw = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    natsStatus s = js_AddStream(&raw, connection_->jetstream(), &cfg, nullptr, &jerr);
    detail::StreamInfoPtr si(raw);
    if (s != NATS_OK && jerr == JSStreamNameExistErr && retries_left > 0) {
      // Another process (a NatsPubsub instance, another app in the natspubsub mode) created it
      // between our look and our create: extend theirs instead.
      logger()->info("stream {} was created meanwhile by another process; ensuring it again", spec.name);
      return ensure_stream(spec, retries_left - 1);
    }
    if (s != NATS_OK && jerr == JSStreamSubjectOverlapErr)
      throw OverlapError("stream " + spec.name + ": the server reports overlapping subjects: " +
                             detail::last_error_text(s),
                         spec.name, "");
    detail::check(s, "creating stream " + spec.name, jerr);
    logger()->info("stream {} created with subjects {}", spec.name, join(spec.subjects));
    result.action = EnsureAction::created;
    result.subjects = spec.subjects;
    return result;
  }

  // The stream exists: add what is missing, never weaken what an operator set.
  std::vector<std::string> missing;
  for (const auto& s : spec.subjects) {
    if (!covered_by(s, existing->subjects)) missing.push_back(s);
  }
  guard(missing);

  jsStreamInfo* raw = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus st = js_GetStreamInfo(&raw, connection_->jetstream(), spec.name.c_str(), nullptr, &jerr);
  detail::StreamInfoPtr si(raw);
  detail::check(st, "reading stream " + spec.name, jerr);
  jsStreamConfig* cfg = si->Config;

  auto differs = [&](const std::string& what, const std::string& theirs, const std::string& ours) {
    if (theirs != ours) {
      result.not_applied.push_back(what + ": server has " + theirs + ", we asked " + ours);
    }
  };
  differs("replicas", std::to_string(cfg->Replicas), std::to_string(spec.replicas));
  differs("retention", retention_name(cfg->Retention), retention_name(to_cnats(spec.retention)));
  differs("storage", cfg->Storage == js_MemoryStorage ? "memory" : "file", spec.memory_storage ? "memory" : "file");
  differs("max_age_ns", std::to_string(cfg->MaxAge), std::to_string(to_nanos(spec.max_age)));
  differs("max_bytes", std::to_string(cfg->MaxBytes), std::to_string(spec.max_bytes));
  differs("max_msgs", std::to_string(cfg->MaxMsgs), std::to_string(spec.max_msgs));
  for (const auto& d : result.not_applied) logger()->warn("stream {}: kept as found: {}", spec.name, d);

  // A stream may not hold overlapping subjects: a broader subject we add replaces the ones it covers.
  std::vector<std::string> new_subjects;
  for (const auto& s : existing->subjects) {
    if (!covered_by(s, missing)) new_subjects.push_back(s);
  }
  new_subjects.insert(new_subjects.end(), missing.begin(), missing.end());
  const int64_t wanted_dupes = to_nanos(spec.duplicate_window);
  const bool widen_dupes = cfg->Duplicates < wanted_dupes;

  if (!missing.empty() || widen_dupes) {
    std::vector<const char*> subjects;
    for (const auto& s : new_subjects) subjects.push_back(s.c_str());
    const char** saved_subjects = cfg->Subjects;
    const int saved_len = cfg->SubjectsLen;
    cfg->Subjects = subjects.data();
    cfg->SubjectsLen = static_cast<int>(subjects.size());
    if (widen_dupes) cfg->Duplicates = wanted_dupes;
    jsStreamInfo* updated_raw = nullptr;
    jsErrCode uerr = static_cast<jsErrCode>(0);
    natsStatus us = js_UpdateStream(&updated_raw, connection_->jetstream(), cfg, nullptr, &uerr);
    detail::StreamInfoPtr updated(updated_raw);
    // Give cnats its own array back before it frees the info object.
    cfg->Subjects = saved_subjects;
    cfg->SubjectsLen = saved_len;
    detail::check(us, "updating stream " + spec.name, uerr);
    // A stream update replaces the whole subject list and the server has no compare-and-set:
    // another process adding its subject at the same moment (apps of one environment starting
    // together in the natspubsub mode) may replace ours with a list read before our update.
    // Look again once such an update would have landed, and add ours back; each process does
    // the same for its own, so the list settles with everyone's (mixed_deployment_test).
    if (!missing.empty() && retries_left > 0) {
      thread_local std::mt19937 jitter{std::random_device{}()};
      std::this_thread::sleep_for(kSettleDelay + Millis{std::uniform_int_distribution<int>(0, 100)(jitter)});
      const auto now = stream_info(spec.name).subjects;
      if (!std::all_of(missing.begin(), missing.end(), [&](const auto& m) { return covered_by(m, now); })) {
        logger()->info("stream {}: our subjects were replaced by a concurrent update; ensuring it again", spec.name);
        return ensure_stream(spec, retries_left - 1);
      }
    }
    if (!missing.empty()) result.changes.push_back("subjects: +" + join(missing));
    if (widen_dupes) result.changes.push_back("duplicate_window_ms: " + std::to_string(spec.duplicate_window.count()));
    result.action = EnsureAction::updated;
    logger()->info("stream {} updated: {}", spec.name, join(result.changes));
  }
  result.subjects = new_subjects;
  return result;
}

StreamResult Topology::ensure_events_stream() { return ensure_stream(events_stream_spec(connection_->config())); }
StreamResult Topology::ensure_dlq_stream() { return ensure_stream(dlq_stream_spec(connection_->config())); }

StreamResult Topology::ensure_replay_stream() { return ensure_stream(replay_stream_spec(connection_->config())); }
StreamResult Topology::ensure_app_subjects(std::string_view app) {
  const auto& config = connection_->config();
  if (config.topology != TopologyMode::natspubsub)
    throw TopologyError("ensure_app_subjects: only in the natspubsub topology mode (one stream for every app)");
  subject::validate_token(app, "app");
  auto spec = events_stream_spec(config);
  spec.subjects = {config.env + ".events.>", config.env + "." + std::string(app) + ".>"};
  return ensure_stream(spec);
}

bool Topology::consumer_exists(const std::string& stream, const std::string& durable) const {
  jsConsumerInfo* raw = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_GetConsumerInfo(&raw, connection_->jetstream(), stream.c_str(), durable.c_str(), nullptr, &jerr);
  detail::ConsumerInfoPtr ci(raw);
  if (is_not_found(s, jerr, JSConsumerNotFoundErr)) return false;
  detail::check(s, "reading consumer " + durable, jerr);
  return true;
}

void Topology::delete_consumer(const std::string& stream, const std::string& durable) {
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_DeleteConsumer(connection_->jetstream(), stream.c_str(), durable.c_str(), nullptr, &jerr);
  if (is_not_found(s, jerr, JSConsumerNotFoundErr)) return;
  detail::check(s, "deleting consumer " + durable, jerr);
}

ConsumerResult Topology::ensure_consumer(const ConsumerSpec& spec, bool recreate) {
  subject::validate_token(spec.durable, "durable name");
  subject::validate_filter(spec.filter_subject);
  ConsumerResult result;
  result.durable = spec.durable;
  result.stream = spec.stream;
  if (result.stream.empty()) {
    auto found = stream_for(spec.filter_subject);
    if (!found)
      throw TopologyError("consumer " + spec.durable + ": no stream captures " + spec.filter_subject +
                          " (the publishing app must create its stream first)");
    result.stream = *found;
  }

  std::vector<int64_t> backoff;
  for (auto b : spec.backoff) backoff.push_back(to_nanos(b));
  jsConsumerConfig cfg;
  jsConsumerConfig_Init(&cfg);
  cfg.Durable = spec.durable.c_str();
  cfg.Description = spec.description.empty() ? nullptr : spec.description.c_str();
  cfg.AckPolicy = js_AckExplicit;
  cfg.DeliverPolicy = js_DeliverAll;
  cfg.FilterSubject = spec.filter_subject.c_str();
  cfg.AckWait = to_nanos(spec.ack_wait);
  cfg.MaxDeliver = spec.max_deliver;
  cfg.BackOff = backoff.empty() ? nullptr : backoff.data();
  cfg.BackOffLen = static_cast<int>(backoff.size());
  cfg.MaxAckPending = spec.max_ack_pending;

  auto* js = connection_->jetstream();
  auto create = [&]() {
    jsConsumerInfo* raw = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    natsStatus s = js_AddConsumer(&raw, js, result.stream.c_str(), &cfg, nullptr, &jerr);
    detail::ConsumerInfoPtr ci(raw);
    detail::check(s, "creating consumer " + spec.durable + " on stream " + result.stream, jerr);
  };

  jsConsumerInfo* raw = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_GetConsumerInfo(&raw, js, result.stream.c_str(), spec.durable.c_str(), nullptr, &jerr);
  detail::ConsumerInfoPtr info(raw);
  if (is_not_found(s, jerr, JSConsumerNotFoundErr)) {
    create();
    logger()->info("consumer {} created on stream {} for {}", spec.durable, result.stream, spec.filter_subject);
    result.action = EnsureAction::created;
    result.ack_wait = spec.ack_wait;
    result.max_deliver = spec.max_deliver;
    result.max_ack_pending = spec.max_ack_pending;
    return result;
  }
  detail::check(s, "reading consumer " + spec.durable, jerr);

  const jsConsumerConfig* have = info->Config;
  result.ack_wait = Millis{have->AckWait / kNanosPerMilli};
  result.max_deliver = have->MaxDeliver;
  result.max_ack_pending = have->MaxAckPending;
  auto note = [&](const std::string& what, const std::string& from, const std::string& to) {
    if (from != to) result.changes.push_back(what + ": " + from + " -> " + to);
  };
  note("filter_subject", have->FilterSubject ? have->FilterSubject : "", spec.filter_subject);
  note("ack_wait_ns", std::to_string(have->AckWait), std::to_string(cfg.AckWait));
  note("max_deliver", std::to_string(have->MaxDeliver), std::to_string(cfg.MaxDeliver));
  note("max_ack_pending", std::to_string(have->MaxAckPending), std::to_string(cfg.MaxAckPending));
  std::vector<int64_t> have_backoff(have->BackOff, have->BackOff + have->BackOffLen);
  if (have_backoff != backoff) result.changes.push_back("backoff changed");
  if (have->DeliverSubject != nullptr) result.changes.push_back("push consumer -> pull consumer");
  if (have->AckPolicy != js_AckExplicit) result.changes.push_back("ack policy -> explicit");
  if (result.changes.empty()) return result;

  if (spec.adopt_existing) {
    // Shared with instances in another language that created it with their own settings:
    // changing it under them would change their retries, so it is used as found. What it
    // cannot serve (other messages, push delivery, no acks) is still refused.
    const std::string have_filter = have->FilterSubject ? have->FilterSubject : "";
    if (have_filter != spec.filter_subject || have->DeliverSubject != nullptr || have->AckPolicy != js_AckExplicit)
      throw TopologyError("consumer " + spec.durable + " on stream " + result.stream + " exists as filter \"" +
                          have_filter + "\"" + (have->DeliverSubject != nullptr ? ", push" : "") +
                          (have->AckPolicy != js_AckExplicit ? ", ack policy not explicit" : "") +
                          "; a pull consumer with explicit acks on " + spec.filter_subject + " is needed");
    result.not_applied = std::move(result.changes);
    result.changes.clear();
    result.action = EnsureAction::adopted;
    logger()->warn("consumer {} on stream {} adopted as found; not applied: {}", spec.durable, result.stream,
                   join(result.not_applied));
    return result;
  }

  jsConsumerInfo* updated_raw = nullptr;
  jsErrCode uerr = static_cast<jsErrCode>(0);
  natsStatus us = js_UpdateConsumer(&updated_raw, js, result.stream.c_str(), &cfg, nullptr, &uerr);
  detail::ConsumerInfoPtr updated(updated_raw);
  if (us == NATS_OK) {
    logger()->info("consumer {} updated: {}", spec.durable, join(result.changes));
    result.action = EnsureAction::updated;
    result.ack_wait = spec.ack_wait;
    result.max_deliver = spec.max_deliver;
    result.max_ack_pending = spec.max_ack_pending;
    return result;
  }
  const std::string reason = detail::last_error_text(us);
  if (!recreate)
    throw TopologyError("consumer " + spec.durable + " on stream " + result.stream +
                        ": the server refused the change " + join(result.changes) + ": " + reason +
                        "; pass recreate=true to delete and recreate it (its delivery state is lost)");
  logger()->warn("consumer {}: server refused update ({}); recreating as asked", spec.durable, reason);
  delete_consumer(result.stream, spec.durable);
  create();
  result.action = EnsureAction::recreated;
  result.ack_wait = spec.ack_wait;
  result.max_deliver = spec.max_deliver;
  result.max_ack_pending = spec.max_ack_pending;
  return result;
}

}  // namespace natspubsub
