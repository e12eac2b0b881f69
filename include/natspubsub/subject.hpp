#pragma once
// Subjects are `{env}.{app}.{topic}`; every token is made of [A-Za-z0-9_-]. A topic may have
// several dot-separated tokens. Filters may use `*` (one token) and `>` (one or more trailing tokens).
//
//   auto s = natspubsub::subject::build("prod", "orders", "order.created");  // "prod.orders.order.created"
//   natspubsub::subject::matches("prod.orders.>", s);                          // true
//   natspubsub::subject::overlaps("prod.orders.>", "prod.*.order.created");    // true
//
// Two rules for what a token may hold. Everything the library builds or is configured with
// (build, validate_*, to_name) follows the strict one above. matches, overlaps and covers also
// take subjects the library did not make (the overlap guard compares with every stream on the
// server, e.g. `$KV.bucket.>` of a key-value bucket), so they accept what the NATS server accepts:
// non-empty tokens without whitespace or control bytes; a token other than `*` or `>` is literal.
// Every function that checks throws SubjectError with a message naming the part (env, app,
// topic, subject, filter), the bad token or character, and the rule.
#include <string>
#include <string_view>
#include <vector>

namespace natspubsub::subject {

/// Splits on '.', keeping empty tokens (so "a..b" yields an empty middle token).
[[nodiscard]] std::vector<std::string_view> tokens(std::string_view subject);

/// True when `token` is non-empty and made only of [A-Za-z0-9_-].
[[nodiscard]] bool is_valid_token(std::string_view token) noexcept;

/// Throws SubjectError naming `what` (e.g. "env") unless `token` is a valid single token.
void validate_token(std::string_view token, std::string_view what = "token");

/// Throws SubjectError unless `topic` is one or more valid tokens joined by '.' (no wildcards).
void validate_topic(std::string_view topic);

/// Throws SubjectError unless `subject` is a valid literal subject (no wildcards).
void validate_subject(std::string_view subject);

/// Throws SubjectError unless `filter` is a valid filter: tokens, `*` anywhere, `>` only last.
void validate_filter(std::string_view filter);

/// Builds `{env}.{app}.{topic}`; validates every part (SubjectError names the bad part).
[[nodiscard]] std::string build(std::string_view env, std::string_view app, std::string_view topic);

/// True when the literal `subject` is matched by `filter` (`*` one token, `>` one or more).
/// Throws SubjectError when `filter` is no filter or `subject` no literal subject (server rule).
[[nodiscard]] bool matches(std::string_view filter, std::string_view subject);

/// True when some literal subject would be matched by both filters. Symmetric.
/// Throws SubjectError when either is no filter (server rule).
[[nodiscard]] bool overlaps(std::string_view a, std::string_view b);

/// True when every subject matched by `inner` is also matched by `outer` (so covers(f, f) holds).
/// Throws SubjectError when either is no filter (server rule).
[[nodiscard]] bool covers(std::string_view outer, std::string_view inner);

/// Makes a filter usable in a consumer or stream name: '.' -> '_', '*' -> "any", '>' -> "all";
/// the result holds only [A-Za-z0-9_-]. Throws SubjectError unless validate_filter accepts it.
/// Not one-to-one: "a.b" and "a_b" both give "a_b", "a.*" and "a.any" both give "a_any"; a caller
/// that derives durable names from it must not assume distinct filters give distinct names.
[[nodiscard]] std::string to_name(std::string_view filter);

}  // namespace natspubsub::subject
