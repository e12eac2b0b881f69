#include <natspubsub/store/database.hpp>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdlib>

#include <natspubsub/store/postgres.hpp>
#include <natspubsub/store/sqlite.hpp>

#include "store/postgres_exec.hpp"

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

std::string percent_decode(std::string_view text, std::string_view url, const char* what) {
  std::string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '%') {
      out += text[i];
      continue;
    }
    int value = 0;
    if (i + 2 >= text.size()) bad_url(url, std::string("bad percent-encoding in the ") + what);
    auto res = std::from_chars(text.data() + i + 1, text.data() + i + 3, value, 16);
    if (res.ec != std::errc() || res.ptr != text.data() + i + 3) {
      bad_url(url, std::string("bad percent-encoding in the ") + what);
    }
    out += static_cast<char>(value);
    i += 2;
  }
  return out;
}

std::string quote_conninfo(const std::string& value) {
  std::string out = "'";
  for (char c : value) {
    if (c == '\\' || c == '\'') out += '\\';
    out += c;
  }
  out += '\'';
  return out;
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

  std::string_view rest;
  if (starts_with_nocase(url, "postgresql://")) {
    rest = url.substr(13);
  } else if (starts_with_nocase(url, "postgres://")) {
    rest = url.substr(11);
  } else {
    bad_url(url, "unknown scheme");
  }
  result.backend_ = Backend::postgres;

  std::string_view query;
  if (auto q = rest.find('?'); q != std::string_view::npos) {
    query = rest.substr(q + 1);
    rest = rest.substr(0, q);
  }
  auto slash = rest.find('/');
  if (slash == std::string_view::npos) bad_url(url, "no database name");
  auto authority = rest.substr(0, slash);
  auto raw_database = rest.substr(slash + 1);
  if (raw_database.empty()) bad_url(url, "no database name");
  if (raw_database.find('/') != std::string_view::npos) bad_url(url, "the database name contains '/'");
  result.database_ = percent_decode(raw_database, url, "database name");

  std::string_view hostport = authority;
  std::string_view raw_user;
  if (auto at = authority.rfind('@'); at != std::string_view::npos) {
    auto userinfo = authority.substr(0, at);
    hostport = authority.substr(at + 1);
    auto colon = userinfo.find(':');
    raw_user = userinfo.substr(0, colon);
    if (colon != std::string_view::npos) {
      result.raw_password_ = std::string(userinfo.substr(colon + 1));
      result.password_ = percent_decode(result.raw_password_, url, "password");
    }
    result.user_ = percent_decode(raw_user, url, "user name");
  }

  std::string_view port_text;
  if (!hostport.empty() && hostport.front() == '[') {
    auto close = hostport.find(']');
    if (close == std::string_view::npos) bad_url(url, "unterminated '[' in the host");
    result.host_ = std::string(hostport.substr(1, close - 1));
    auto after = hostport.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':') bad_url(url, "unexpected text after the host");
      port_text = after.substr(1);
      if (port_text.empty()) bad_url(url, "empty port");
    }
  } else {
    auto colon = hostport.find(':');
    result.host_ = std::string(hostport.substr(0, colon));
    if (colon != std::string_view::npos) {
      port_text = hostport.substr(colon + 1);
      if (port_text.empty()) bad_url(url, "empty port");
    }
  }
  if (result.host_.empty()) bad_url(url, "no host");
  if (!port_text.empty()) {
    int port = 0;
    auto res = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
    if (res.ec != std::errc() || res.ptr != port_text.data() + port_text.size() || port < 1 || port > 65535) {
      bad_url(url, "the port is not a number from 1 to 65535");
    }
    result.port_ = port;
  }

  std::string redacted_query;
  while (!query.empty()) {
    auto amp = query.find('&');
    auto pair = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view{} : query.substr(amp + 1);
    if (pair.empty()) continue;
    auto eq = pair.find('=');
    if (eq == std::string_view::npos || eq == 0) bad_url(url, "query parameters must be key=value");
    std::string key(pair.substr(0, eq));
    bool key_ok = std::all_of(key.begin(), key.end(), [](char c) {
      return std::islower(static_cast<unsigned char>(c)) || c == '_';
    });
    if (!key_ok) bad_url(url, "bad query parameter name '" + key + "'");
    std::string value = percent_decode(pair.substr(eq + 1), url, "query parameters");
    if (key == "password") {
      result.raw_password_ = std::string(pair.substr(eq + 1));
      result.password_ = value;
    } else if (key == "host" || key == "port" || key == "dbname" || key == "user") {
      bad_url(url, "'" + key + "' belongs in the URL itself, not in a query parameter");
    } else {
      result.options_.emplace_back(key, value);
    }
    redacted_query += (redacted_query.empty() ? "?" : "&") + key + "=" +
                      (key == "password" ? std::string("***") : std::string(pair.substr(eq + 1)));
  }

  std::string redacted(url.substr(0, url.find("://") + 3));
  if (auto at = authority.rfind('@'); at != std::string_view::npos) {
    redacted += std::string(raw_user);
    if (authority.substr(0, at).find(':') != std::string_view::npos) redacted += ":***";
    redacted += "@";
  }
  redacted += std::string(hostport) + "/" + std::string(raw_database) + redacted_query;
  result.redacted_ = std::move(redacted);
  return result;
}

std::string DatabaseUrl::postgres_conninfo() const {
  std::string out = "host=" + quote_conninfo(host_) + " port=" + std::to_string(port_) +
                    " dbname=" + quote_conninfo(database_);
  if (!user_.empty()) out += " user=" + quote_conninfo(user_);
  if (!password_.empty()) out += " password=" + quote_conninfo(password_);
  bool has_timeout = false;
  for (const auto& [key, value] : options_) {
    out += " " + key + "=" + quote_conninfo(value);
    has_timeout = has_timeout || key == "connect_timeout";
  }
  // Every wait has a bound: libpq would otherwise wait for the operating system's TCP timeout.
  if (!has_timeout) out += " connect_timeout=10";
  return out;
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
  return *sqlite_;
}

pqxx::dbtransaction& Transaction::postgres() const {
  if (postgres_ == nullptr) throw DatabaseError("this transaction is an SQLite transaction, not PostgreSQL");
  return *postgres_;
}

std::int64_t Transaction::execute(std::string_view sql, const Params& params) {
  if (sqlite_ != nullptr) return sqlite_->execute(sql, params);
  return static_cast<std::int64_t>(detail::pg_exec(*postgres_, sql, params).affected_rows());
}

std::vector<Row> Transaction::query(std::string_view sql, const Params& params) {
  if (sqlite_ != nullptr) return sqlite_->query(sql, params);
  return detail::to_rows(detail::pg_exec(*postgres_, sql, params));
}

std::unique_ptr<Database> open_database(std::string_view url, const OpenOptions& options) {
  auto parsed = DatabaseUrl::parse(url);
  if (parsed.backend() == Backend::sqlite) {
    return std::make_unique<SqliteDatabase>(parsed.path(), SqliteDatabase::Options{options.sqlite_busy_timeout, options.create_sqlite_file});
  }
  return std::make_unique<PostgresDatabase>(std::move(parsed));
}

}  // namespace natspubsub::store
