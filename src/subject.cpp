#include <natspubsub/subject.hpp>

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include <natspubsub/error.hpp>

#include "printable.hpp"

namespace natspubsub::subject {
namespace {

constexpr std::string_view kTokenRule = "a token is non-empty and uses only A-Z, a-z, 0-9, '_' and '-'";
constexpr std::string_view kDotRule = "tokens are separated by single dots (no leading, trailing or double dot)";
constexpr std::string_view kAnyOne = "*";
constexpr std::string_view kAnyRest = ">";

[[noreturn]] void fail(std::string_view what, std::string_view text, std::string_view reason) {
  throw SubjectError("invalid " + std::string(what) + " " + detail::quoted(text) + ": " + std::string(reason));
}

bool is_token_char(char c) noexcept {
  // Spelled out rather than std::isalnum: the locale must not widen what a subject may hold.
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

bool is_wildcard(std::string_view token) noexcept { return token == kAnyOne || token == kAnyRest; }

std::string describe_byte(char c) {
  const auto byte = static_cast<unsigned char>(c);
  if (byte >= 0x21 && byte < 0x7f) {
    return std::string("character '") + c + "'";
  }
  if (byte == ' ') {
    return "a space";
  }
  return "byte " + detail::printable(std::string_view(&c, 1)) + (byte >= 0x80 ? " (non-ASCII)" : " (control)");
}

std::string token_position(std::size_t index, std::size_t count) {
  return "token " + std::to_string(index + 1) + " of " + std::to_string(count);
}

// Which characters a literal token may hold.
enum class Charset {
  // The library's own rule, for everything it builds: [A-Za-z0-9_-].
  library,
  // The NATS server's rule, for subjects the library did not make (the overlap guard reads
  // every stream on the server, e.g. `$KV.bucket.>`): no whitespace or control bytes.
  server,
};

// Splits `text` and checks it: tokens non-empty, wildcards only when allowed, '>' only last.
std::vector<std::string_view> parse(std::string_view text, std::string_view what, Charset charset,
                                    bool allow_wildcards) {
  if (text.empty()) {
    fail(what, text, "must not be empty");
  }
  auto parts = tokens(text);
  for (std::size_t i = 0; i < parts.size(); ++i) {
    const auto token = parts[i];
    if (token.empty()) {
      fail(what, text, token_position(i, parts.size()) + " is empty; " + std::string(kDotRule));
    }
    if (is_wildcard(token)) {
      if (!allow_wildcards) {
        fail(what, text, "'" + std::string(token) + "' is a wildcard; a " + std::string(what) + " must be literal");
      }
      if (token == kAnyRest && i + 1 != parts.size()) {
        fail(what, text, "'>' is only allowed as the last token");
      }
      continue;
    }
    for (const char c : token) {
      const auto byte = static_cast<unsigned char>(c);
      if (charset == Charset::library && !is_token_char(c)) {
        fail(what, text,
             describe_byte(c) + " in " + token_position(i, parts.size()) + " is not allowed; " + std::string(kTokenRule));
      }
      if (charset == Charset::server && (byte <= 0x20 || byte == 0x7f)) {
        fail(what, text, describe_byte(c) + " in " + token_position(i, parts.size()) + " is not allowed in a subject");
      }
    }
  }
  return parts;
}

}  // namespace

std::vector<std::string_view> tokens(std::string_view subject) {
  std::vector<std::string_view> out;
  std::size_t start = 0;
  while (true) {
    const auto dot = subject.find('.', start);
    if (dot == std::string_view::npos) {
      out.push_back(subject.substr(start));
      return out;
    }
    out.push_back(subject.substr(start, dot - start));
    start = dot + 1;
  }
}

bool is_valid_token(std::string_view token) noexcept {
  if (token.empty()) {
    return false;
  }
  for (const char c : token) {
    if (!is_token_char(c)) {
      return false;
    }
  }
  return true;
}

void validate_token(std::string_view token, std::string_view what) {
  if (token.empty()) {
    fail(what, token, "must not be empty; " + std::string(kTokenRule));
  }
  for (std::size_t pos = 0; pos < token.size(); ++pos) {
    if (!is_token_char(token[pos])) {
      // A dot gets its own hint: env and app are single tokens, only the topic may have several.
      const std::string hint = token[pos] == '.' ? "; it must be a single token" : "";
      fail(what, token,
           describe_byte(token[pos]) + " at position " + std::to_string(pos + 1) + " is not allowed; " +
               std::string(kTokenRule) + hint);
    }
  }
}

void validate_topic(std::string_view topic) { (void)parse(topic, "topic", Charset::library, false); }

void validate_subject(std::string_view subject) { (void)parse(subject, "subject", Charset::library, false); }

void validate_filter(std::string_view filter) { (void)parse(filter, "filter", Charset::library, true); }

std::string build(std::string_view env, std::string_view app, std::string_view topic) {
  validate_token(env, "env");
  validate_token(app, "app");
  validate_topic(topic);
  std::string out;
  out.reserve(env.size() + app.size() + topic.size() + 2);
  out.append(env).append(".").append(app).append(".").append(topic);
  return out;
}

bool matches(std::string_view filter, std::string_view subject) {
  const auto f = parse(filter, "filter", Charset::server, true);
  const auto s = parse(subject, "subject", Charset::server, false);
  for (std::size_t i = 0; i < f.size(); ++i) {
    if (f[i] == kAnyRest) {
      return s.size() > i;
    }
    if (i >= s.size() || (f[i] != kAnyOne && f[i] != s[i])) {
      return false;
    }
  }
  return s.size() == f.size();
}

bool overlaps(std::string_view a, std::string_view b) {
  const auto x = parse(a, "filter", Charset::server, true);
  const auto y = parse(b, "filter", Charset::server, true);
  for (std::size_t i = 0;; ++i) {
    if (i == x.size() || i == y.size()) {
      // One side wants exactly i tokens; the other, not yet at its end, wants at least i + 1
      // (a '>' there still needs one).
      return x.size() == y.size();
    }
    if (x[i] == kAnyRest || y[i] == kAnyRest) {
      // The other side's remaining tokens match some non-empty tail, and '>' takes any such tail.
      return true;
    }
    if (x[i] != kAnyOne && y[i] != kAnyOne && x[i] != y[i]) {
      return false;
    }
  }
}

bool covers(std::string_view outer, std::string_view inner) {
  const auto o = parse(outer, "filter", Charset::server, true);
  const auto n = parse(inner, "filter", Charset::server, true);
  for (std::size_t i = 0;; ++i) {
    if (i == o.size()) {
      // Outer wants exactly i tokens; inner must not reach past them.
      return i == n.size();
    }
    if (o[i] == kAnyRest) {
      // Every subject inner matches has a token here (inner has not ended), and '>' takes the rest.
      return i < n.size();
    }
    if (i == n.size() || n[i] == kAnyRest) {
      // Inner stops here (outer wants more) or goes on without bound (outer, without '>', does not).
      return false;
    }
    if (o[i] != kAnyOne && o[i] != n[i]) {
      // A literal in outer only covers the same literal in inner, never '*'.
      return false;
    }
  }
}

std::string to_name(std::string_view filter) {
  validate_filter(filter);
  std::string out;
  out.reserve(filter.size() + 8);
  for (const char c : filter) {
    switch (c) {
      case '.': out += '_'; break;
      case '*': out += "any"; break;
      case '>': out += "all"; break;
      default: out += c;
    }
  }
  return out;
}

}  // namespace natspubsub::subject
