#include <natspubsub/store/database.hpp>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdlib>
#include <memory>

#include <natspubsub/features.hpp>
#include <natspubsub/store/sqlite.hpp>

#if NATSPUBSUB_HAS_POSTGRES
#include <libpq-fe.h>

#include <natspubsub/store/postgres.hpp>

#include "store/postgres_exec.hpp"
#endif

namespace natspubsub::store {

std::string_view to_string(Backend backend) noexcept {
  return backend == Backend::sqlite ? "sqlite" : "postgresql";
}

namespace {

bool starts_with_nocase(std::string_view s, std::string_view prefix) {
  if (s.size() < prefix.size()) return false;
  for (std::size_t i = 0; i < prefix.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(s[i])) != prefix[i]) return false;
  }
  return true;
}

// For error messages about a URL we could not parse: hide whatever may be a password, i.e.
// the text between the user name and the last '@' of the authority, and password= values.
std::string redact_unparsed(std::string_view url) {
  std::string out(url);
  auto scheme_end = out.find("://");
  if (scheme_end != std::string::npos) {
    auto start = scheme_end + 3;
    auto query = out.find('?', start);
    auto authority_end = out.find('/', start);
    auto limit = std::min(query, authority_end);
    auto at = out.rfind('@', limit == std::string::npos ? std::string::npos : limit);
    if (at != std::string::npos && at >= start) {
      auto colon = out.find(':', start);
      if (colon != std::string::npos && colon < at) out.replace(colon + 1, at - colon - 1, "***");
    }
  }
  for (std::size_t pos = 0; (pos = out.find("password=", pos)) != std::string::npos;) {
    pos += 9;
    auto end = out.find('&', pos);
    out.replace(pos, (end == std::string::npos ? out.size() : end) - pos, "***");
  }
  return out;
}

[[noreturn]] void bad_url(std::string_view url, const std::string& why) {
  throw DatabaseUrlError("invalid database URL '" + redact_unparsed(url) + "': " + why +
                         " (expected sqlite:///absolute/path.db, sqlite://relative/path.db or "
                         "postgresql://user:password@host:port/database)");
}

void replace_all(std::string& text, const std::string& needle, std::string_view with) {
  if (needle.empty()) return;
  for (std::size_t pos = 0; (pos = text.find(needle, pos)) != std::string::npos; pos += with.size()) {
    text.replace(pos, needle.size(), with);
  }
}

}  // namespace

DatabaseUrl DatabaseUrl::parse(std::string_view url) {
  DatabaseUrl result;
  if (starts_with_nocase(url, "sqlite://")) {
    auto path = url.substr(9);
    if (path.empty()) bad_url(url, "no file path");
    if (path.find('?') != std::string_view::npos) bad_url(url, "SQLite URLs take no query parameters");
    result.backend_ = Backend::sqlite;
    result.path_ = std::string(path);  // "/abs.db" from sqlite:///abs.db, "rel.db" from sqlite://rel.db
    result.redacted_ = std::string(url);
    return result;
  }

  std::string text;
  if (starts_with_nocase(url, "postgresql://")) {
    text = "postgresql://" + std::string(url.substr(13));
  } else if (starts_with_nocase(url, "postgres://")) {
    text = "postgres://" + std::string(url.substr(11));
  } else {
    bad_url(url, "unknown scheme");
  }
#if !NATSPUBSUB_HAS_POSTGRES
  throw DatabaseUrlError("database URL '" + redact_unparsed(url) +
                         "': this build of natspubsub has no PostgreSQL support (NATSPUBSUB_WITH_POSTGRES=OFF); "
                         "use sqlite:///path.db");
#else
  result.backend_ = Backend::postgres;
  // libpq reads the URI itself (every form it documents: no host for the default socket,
  // ?host=/run/postgresql, several hosts, any connection parameter); we ask it what it found.
  char* raw_error = nullptr;
  std::unique_ptr<PQconninfoOption, decltype(&PQconninfoFree)> options(PQconninfoParse(text.c_str(), &raw_error),
                                                                        &PQconninfoFree);
  if (!options) {
    std::string why = raw_error != nullptr ? raw_error : "libpq could not parse it (out of memory)";
    if (raw_error != nullptr) PQfreemem(raw_error);
    while (!why.empty() && (why.back() == '\n' || why.back() == ' ')) why.pop_back();
    // libpq may quote the offending part; hide whatever looks like the password in it too.
    DatabaseUrl guess;
    auto at = text.rfind('@', text.find_first_of("/?", text.find("://") + 3));
    auto colon = text.find(':', text.find("://") + 3);
    if (at != std::string::npos && colon != std::string::npos && colon < at) {
      guess.raw_password_ = text.substr(colon + 1, at - colon - 1);
    }
    bad_url(url, guess.scrub(why));
  }
  for (auto* o = options.get(); o->keyword != nullptr; ++o) {
    if (o->val == nullptr) continue;
    std::string_view key = o->keyword;
    if (key == "host") result.host_ = o->val;
    if (key == "port") result.port_text_ = o->val;
    if (key == "dbname") result.database_ = o->val;
    if (key == "user") result.user_ = o->val;
    if (key == "password") result.password_ = o->val;
    if (key == "connect_timeout") result.has_connect_timeout_ = true;
  }
  // libpq checks ports only when connecting; a typo here should be an error now. "5432,5433"
  // (one per host) is allowed; the first one is port().
  if (!result.port_text_.empty()) {
    std::string_view ports = result.port_text_;
    for (std::size_t i = 0; i <= ports.size();) {
      auto comma = std::min(ports.find(',', i), ports.size());
      auto one = ports.substr(i, comma - i);
      int port = 0;
      auto res = std::from_chars(one.data(), one.data() + one.size(), port);
      if (!one.empty() && (res.ec != std::errc() || res.ptr != one.data() + one.size() || port < 1 || port > 65535)) {
        bad_url(url, "the port is not a number from 1 to 65535");
      }
      if (i == 0 && !one.empty()) result.port_ = port;
      i = comma + 1;
    }
  }
  // The password as written (maybe percent-encoded), for scrub(): from the userinfo or ?password=.
  auto authority_start = text.find("://") + 3;
  auto authority_end = std::min(text.find('/', authority_start), text.find('?', authority_start));
  auto at = text.rfind('@', authority_end);
  if (at != std::string::npos && at >= authority_start) {
    auto colon = text.find(':', authority_start);
    if (colon != std::string::npos && colon < at) result.raw_password_ = text.substr(colon + 1, at - colon - 1);
  }
  if (auto q = text.find("password=", authority_end == std::string::npos ? text.size() : authority_end);
      q != std::string::npos) {
    auto end = text.find('&', q);
    result.raw_password_ = text.substr(q + 9, (end == std::string::npos ? text.size() : end) - q - 9);
  }
  result.uri_ = std::move(text);
  result.redacted_ = result.scrub(redact_unparsed(result.uri_));
  return result;
#endif
}

std::string DatabaseUrl::postgres_conninfo() const {
  // The URI as written (libpq reads it); only a bound on connecting is added when it has none:
  // libpq would otherwise wait for the operating system's TCP timeout.
  if (has_connect_timeout_) return uri_;
  return uri_ + (uri_.find('?') == std::string::npos ? "?" : "&") + "connect_timeout=10";
}

std::string DatabaseUrl::scrub(std::string text) const {
  replace_all(text, password_, "***");
  replace_all(text, raw_password_, "***");
  return text;
}

// ---------------------------------------------------------------------------------------------

std::int64_t Value::as_int() const {
  if (auto* i = std::get_if<std::int64_t>(&v_)) return *i;
  if (auto* s = std::get_if<std::string>(&v_)) {
    std::int64_t out = 0;
    auto res = std::from_chars(s->data(), s->data() + s->size(), out);
    if (res.ec == std::errc() && res.ptr == s->data() + s->size()) return out;
    throw DatabaseError("value '" + *s + "' is not an integer");
  }
  if (auto* d = std::get_if<double>(&v_)) return static_cast<std::int64_t>(*d);
  throw DatabaseError("value is NULL, expected an integer");
}

double Value::as_real() const {
  if (auto* d = std::get_if<double>(&v_)) return *d;
  if (auto* i = std::get_if<std::int64_t>(&v_)) return static_cast<double>(*i);
  if (auto* s = std::get_if<std::string>(&v_)) {
    char* end = nullptr;
    double out = std::strtod(s->c_str(), &end);
    if (!s->empty() && end == s->c_str() + s->size()) return out;
    throw DatabaseError("value '" + *s + "' is not a number");
  }
  throw DatabaseError("value is NULL, expected a number");
}

std::string Value::as_text() const {
  if (auto* s = std::get_if<std::string>(&v_)) return *s;
  if (auto* i = std::get_if<std::int64_t>(&v_)) return std::to_string(*i);
  if (auto* d = std::get_if<double>(&v_)) {
    char buffer[64];
    auto res = std::to_chars(buffer, buffer + sizeof buffer, *d);  // shortest exact form
    return std::string(buffer, res.ptr);
  }
  throw DatabaseError("value is NULL, expected text");
}

std::optional<std::string> Value::as_optional_text() const {
  if (is_null()) return std::nullopt;
  return as_text();
}

std::optional<std::int64_t> Value::as_optional_int() const {
  if (is_null()) return std::nullopt;
  return as_int();
}

const Value& Row::operator[](std::size_t column) const {
  if (column >= values_.size()) {
    throw DatabaseError("column " + std::to_string(column) + " out of range (row has " +
                        std::to_string(values_.size()) + " columns)");
  }
  return values_[column];
}

// ---------------------------------------------------------------------------------------------

SqliteTransaction& Transaction::sqlite() const {
  if (sqlite_ == nullptr) throw DatabaseError("this transaction is a PostgreSQL transaction, not SQLite");
  first_use();
  return *sqlite_;
}

#if NATSPUBSUB_HAS_POSTGRES
pqxx::dbtransaction& Transaction::postgres() const {
  if (postgres_ == nullptr) throw DatabaseError("this transaction is an SQLite transaction, not PostgreSQL");
  first_use();
  return *postgres_;
}

std::int64_t Transaction::execute(std::string_view sql, const Params& params) {
  first_use();
  if (sqlite_ != nullptr) return sqlite_->execute(sql, params);
  return static_cast<std::int64_t>(detail::pg_exec(*postgres_, sql, params).affected_rows());
}

std::vector<Row> Transaction::query(std::string_view sql, const Params& params) {
  first_use();
  if (sqlite_ != nullptr) return sqlite_->query(sql, params);
  return detail::to_rows(detail::pg_exec(*postgres_, sql, params));
}
#else
// Without PostgreSQL a Transaction can only be made from a SqliteTransaction.
std::int64_t Transaction::execute(std::string_view sql, const Params& params) {
  first_use();
  return sqlite_->execute(sql, params);
}

std::vector<Row> Transaction::query(std::string_view sql, const Params& params) {
  first_use();
  return sqlite_->query(sql, params);
}
#endif

std::unique_ptr<Database> open_database(std::string_view url, const OpenOptions& options) {
  auto parsed = DatabaseUrl::parse(url);
  if (parsed.backend() == Backend::sqlite) {
    return std::make_unique<SqliteDatabase>(parsed.path(), SqliteDatabase::Options{options.sqlite_busy_timeout, options.create_sqlite_file});
  }
#if NATSPUBSUB_HAS_POSTGRES
  return std::make_unique<PostgresDatabase>(std::move(parsed));
#else
  throw DatabaseUrlError("this build of natspubsub has no PostgreSQL support");  // parse() refused it already
#endif
}

}  // namespace natspubsub::store
