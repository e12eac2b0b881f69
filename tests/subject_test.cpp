// Subject building, validation and wildcard algebra. Pure functions: no server needed.
#include <bitset>
#include <cstddef>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include <doctest/doctest.h>

#include <natspubsub/error.hpp>
#include <natspubsub/subject.hpp>

namespace subject = natspubsub::subject;
using natspubsub::SubjectError;
using namespace std::string_literals;

namespace {

// The message of the SubjectError `call` throws; fails the test if it throws nothing or
// something else.
std::string error_of(const std::function<void()>& call) {
  try {
    call();
  } catch (const SubjectError& e) {
    return e.what();
  } catch (...) {
    FAIL("threw something other than SubjectError");
  }
  FAIL("did not throw");
  return {};
}

bool contains(const std::string& text, std::string_view part) { return text.find(part) != std::string::npos; }

std::string join(const std::vector<std::string>& tokens) {
  std::string out;
  for (const auto& t : tokens) {
    if (!out.empty()) {
      out += '.';
    }
    out += t;
  }
  return out;
}

// An independent matcher for cross-checking: recursion over token lists, written from the
// definition ('*' one token, '>' one or more trailing tokens) rather than from the library's loop.
bool reference_match(const std::vector<std::string_view>& f, std::size_t fi, const std::vector<std::string_view>& s,
                     std::size_t si) {
  if (fi == f.size()) {
    return si == s.size();
  }
  if (f[fi] == ">") {
    return si < s.size();
  }
  if (si == s.size()) {
    return false;
  }
  return (f[fi] == "*" || f[fi] == s[si]) && reference_match(f, fi + 1, s, si + 1);
}

}  // namespace

TEST_CASE("tokens splits on dots and keeps empty tokens") {
  using V = std::vector<std::string_view>;
  CHECK(subject::tokens("a") == V{"a"});
  CHECK(subject::tokens("a.b.c") == V{"a", "b", "c"});
  CHECK(subject::tokens("a..b") == V{"a", "", "b"});
  CHECK(subject::tokens(".a") == V{"", "a"});
  CHECK(subject::tokens("a.") == V{"a", ""});
  CHECK(subject::tokens(".") == V{"", ""});
  CHECK(subject::tokens("") == V{""});
  CHECK(subject::tokens("prod.orders.>") == V{"prod", "orders", ">"});
}

TEST_CASE("is_valid_token accepts only non-empty [A-Za-z0-9_-]") {
  for (const std::string_view ok : {"a", "Z", "0", "_", "-", "order-created_v2", "ABCxyz019", "---", "___"}) {
    CAPTURE(ok);
    CHECK(subject::is_valid_token(ok));
  }
  const std::vector<std::string> bad = {"",      " ",     "a b",   " a",        "a ",      "a\tb", "a\nb",
                                        "a\rb",  "a.b",   ".",     "*",         ">",       "a*",   "a>",
                                        "$KV",   "a/b",   "a\\b",  "a:b",       "a+b",     "a,b",  "é",
                                        "caf\xc3\xa9", "\xff", "a\0b"s, "\0"s, "\x7f", "\xe2\x80\x8b" /* zero width space */};
  for (const auto& token : bad) {
    CAPTURE(token);
    CHECK_FALSE(subject::is_valid_token(token));
  }
}

TEST_CASE("validate_token names the part and says the rule") {
  auto message = error_of([] { subject::validate_token("pr od", "env"); });
  CHECK(contains(message, "env"));
  CHECK(contains(message, "\"pr od\""));
  CHECK(contains(message, "a space"));
  CHECK(contains(message, "position 3"));
  CHECK(contains(message, "A-Z, a-z, 0-9, '_' and '-'"));

  message = error_of([] { subject::validate_token("", "app"); });
  CHECK(contains(message, "app"));
  CHECK(contains(message, "must not be empty"));

  message = error_of([] { subject::validate_token("my.app", "app"); });
  CHECK(contains(message, "character '.'"));
  CHECK(contains(message, "single token"));

  message = error_of([] { subject::validate_token("caf\xc3\xa9", "app"); });
  CHECK(contains(message, "non-ASCII"));
  // The bad byte is shown escaped, never raw: messages go into logs and headers.
  CHECK(contains(message, "\\xc3"));
  CHECK_FALSE(contains(message, "\xc3"));

  message = error_of([] { subject::validate_token("a\nb"); });
  CHECK(contains(message, "token"));
  CHECK(contains(message, "\\n"));
  CHECK_FALSE(contains(message, "\n"));

  CHECK_NOTHROW(subject::validate_token("orders", "app"));
}

TEST_CASE("build joins env, app and topic and validates each part") {
  CHECK(subject::build("prod", "orders", "order.created") == "prod.orders.order.created");
  CHECK(subject::build("dev", "shop", "created") == "dev.shop.created");
  CHECK(subject::build("dev", "shop", "a.b.c.d.e") == "dev.shop.a.b.c.d.e");
  CHECK(subject::build("p-1", "my_app", "v2-orders.created") == "p-1.my_app.v2-orders.created");

  struct Case {
    std::string env, app, topic, part, reason;
  };
  const std::vector<Case> cases = {
      {"", "orders", "order.created", "env", "must not be empty"},
      {"pr od", "orders", "order.created", "env", "a space"},
      {"prod.eu", "orders", "order.created", "env", "single token"},
      {"*", "orders", "order.created", "env", "character '*'"},
      {"prod", "", "order.created", "app", "must not be empty"},
      {"prod", "ord>ers", "order.created", "app", "character '>'"},
      {"prod", "ordérs", "order.created", "app", "non-ASCII"},
      {"prod", "orders", "", "topic", "must not be empty"},
      {"prod", "orders", "order..created", "topic", "token 2 of 3 is empty"},
      {"prod", "orders", ".order", "topic", "token 1 of 2 is empty"},
      {"prod", "orders", "order.", "topic", "token 2 of 2 is empty"},
      {"prod", "orders", ".", "topic", "token 1 of 2 is empty"},
      {"prod", "orders", "order.*", "topic", "wildcard"},
      {"prod", "orders", ">", "topic", "wildcard"},
      {"prod", "orders", "order. created", "topic", "a space"},
      {"prod", "orders", "order.created\t", "topic", "(control)"},
      {"prod", "orders", "order.créé", "topic", "non-ASCII"},
      {"prod", "orders", "order.cre*ated", "topic", "character '*'"},
      {"prod", "orders", "order/created", "topic", "character '/'"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.env);
    CAPTURE(c.app);
    CAPTURE(c.topic);
    const auto message = error_of([&] { (void)subject::build(c.env, c.app, c.topic); });
    CHECK(contains(message, "invalid " + c.part + " "));
    CHECK(contains(message, c.reason));
  }
}

TEST_CASE("validate_topic, validate_subject and validate_filter") {
  for (const std::string_view ok : {"a", "a.b", "order.created", "x-1.y_2.Z"}) {
    CAPTURE(ok);
    CHECK_NOTHROW(subject::validate_topic(ok));
    CHECK_NOTHROW(subject::validate_subject(ok));
    CHECK_NOTHROW(subject::validate_filter(ok));
  }
  for (const std::string_view filter : {"*", ">", "a.*", "a.>", "*.b", "a.*.c", "*.*.*", "a.*.>", "*.>"}) {
    CAPTURE(filter);
    CHECK_NOTHROW(subject::validate_filter(filter));
    CHECK(contains(error_of([&] { subject::validate_subject(filter); }), "invalid subject"));
    CHECK(contains(error_of([&] { subject::validate_topic(filter); }), "invalid topic"));
  }
  struct Bad {
    std::string filter, reason;
  };
  const std::vector<Bad> bad_filters = {
      {"", "must not be empty"},         {"a..b", "token 2 of 3 is empty"},   {".a", "token 1 of 2 is empty"},
      {"a.", "token 2 of 2 is empty"},   {"a.>.b", "only allowed as the last"}, {">.a", "only allowed as the last"},
      {">.>", "only allowed as the last"}, {"a.b*", "character '*'"},         {"a.>>", "character '>'"},
      {"a.**", "character '*'"},         {" a", "a space"},                   {"a.b ", "a space"},
      {"a.\xc3\xa9", "non-ASCII"},       {"$KV.b.>", "character '$'"},
  };
  for (const auto& b : bad_filters) {
    CAPTURE(b.filter);
    const auto message = error_of([&] { subject::validate_filter(b.filter); });
    CHECK(contains(message, "invalid filter"));
    CHECK(contains(message, b.reason));
  }
}

TEST_CASE("matches: '*' is exactly one token, '>' one or more trailing tokens") {
  struct Case {
    std::string_view filter, subject;
    bool expected;
  };
  const std::vector<Case> cases = {
      {"a", "a", true},
      {"a", "b", false},
      {"a.b", "a.b", true},
      {"a.b", "a.b.c", false},
      {"a.b.c", "a.b", false},
      {"A.b", "a.b", false},  // case-sensitive, as in NATS
      {"*", "a", true},
      {"*", "a.b", false},
      {"a.*", "a", false},
      {"a.*", "a.b", true},
      {"a.*", "a.b.c", false},
      {"a.*.c", "a.b.c", true},
      {"a.*.c", "a.xyz.c", true},
      {"a.*.c", "a.b.d", false},
      {"a.*.c", "a.c", false},
      {"*.*", "a.b", true},
      {"*.*", "a", false},
      {">", "a", true},
      {">", "a.b.c.d.e", true},
      {"a.>", "a", false},
      {"a.>", "a.b", true},
      {"a.>", "a.b.c", true},
      {"a.>", "b.c", false},
      {"a.*.>", "a.b", false},
      {"a.*.>", "a.b.c", true},
      {"a.*.>", "a.b.c.d", true},
      {"*.>", "a", false},
      {"*.>", "a.b", true},
      // Multi-token topics under the app-wide filter.
      {"prod.orders.>", "prod.orders.order.created", true},
      {"prod.orders.>", "prod.orders.order.item.added", true},
      {"prod.orders.>", "prod.orders", false},
      {"prod.orders.>", "prod.payments.order.created", false},
      {"prod.*.order.created", "prod.orders.order.created", true},
      {"prod.*.order.created", "prod.orders.order.created.v2", false},
      {"prod.*.created", "prod.orders.order.created", false},
      {"prod.orders.order.*", "prod.orders.order.created", true},
      {"prod.orders.order.*", "prod.orders.order.item.added", false},
      {"prod.orders.order.>", "prod.orders.order.item.added", true},
      {"*.orders.>", "dev.orders.order.created", true},
      // Server rule: other tools' subjects are literals too.
      {"$KV.bucket.>", "$KV.bucket.key", true},
      {"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.*.*", "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.S.C", true},
      {"a.b*", "a.b*", true},
      {"a.b*", "a.bc", false},
      {"a.>b", "a.>b", true},
      {"prod.caf\xc3\xa9.>", "prod.caf\xc3\xa9.x", true},
  };
  for (const auto& c : cases) {
    CAPTURE(c.filter);
    CAPTURE(c.subject);
    CHECK(subject::matches(c.filter, c.subject) == c.expected);
  }
}

TEST_CASE("matches, overlaps and covers reject what the server would reject") {
  const std::vector<std::string> bad_filters = {"", "a..b", ".a", "a.", "a.>.b", ">.a", "a b", "a.\tb", "a.\x7f"};
  for (const auto& f : bad_filters) {
    CAPTURE(f);
    CHECK(contains(error_of([&] { (void)subject::matches(f, "a.b"); }), "invalid filter"));
    CHECK(contains(error_of([&] { (void)subject::overlaps(f, "a.b"); }), "invalid filter"));
    CHECK(contains(error_of([&] { (void)subject::overlaps("a.b", f); }), "invalid filter"));
    CHECK(contains(error_of([&] { (void)subject::covers(f, "a.b"); }), "invalid filter"));
    CHECK(contains(error_of([&] { (void)subject::covers("a.b", f); }), "invalid filter"));
  }
  CHECK_THROWS_AS((void)subject::matches("a.b", "a\0b"s), SubjectError);
  for (const std::string_view s : {"", "a..b", "a.*", "a.>", "*", ">", "a. b"}) {
    CAPTURE(s);
    CHECK(contains(error_of([&] { (void)subject::matches(">", s); }), "invalid subject"));
  }
}

TEST_CASE("overlaps: known pairs, both orders") {
  struct Case {
    std::string_view a, b;
    bool expected;
  };
  const std::vector<Case> cases = {
      {"a", "a", true},
      {"a", "b", false},
      {"a.b", "a.b.c", false},
      {"a.b", "a", false},
      {"*", "a", true},
      {"*", "a.b", false},
      {"*", "*", true},
      {"*", ">", true},
      {"*.*", ">", true},
      {"*.*", "*", false},
      {">", ">", true},
      {">", "a.b.c.d", true},
      {"a.>", "a", false},
      {"a.>", "a.b", true},
      {"a.>", "a.b.c.d", true},
      {"a.>", "b.>", false},
      {"a.>", "*.b", true},
      {"a.>", "*", false},
      {"a.>", "*.>", true},
      {"a.*", "a.>", true},
      {"a.*", "a.b.>", false},
      {"a.*.c", "a.b.*", true},
      {"a.*.c", "a.b.d", false},
      {"a.*.c", "*.b.>", true},
      {"a.*.c.d", "a.b.>", true},
      {"a.b.c", "*.*.*", true},
      {"a.b.c", "*.*", false},
      {"prod.orders.>", "prod.*.order.created", true},
      {"prod.orders.>", "prod.payments.>", false},
      {"prod.orders.>", "prod.events.>", false},
      {"prod.events.>", "prod.*.order.created", true},
      // The JS library's shared stream captures {env}.events.> and {env}.{app}.>.
      {"prod.orders.>", "dlq.prod.orders.>", false},
      {"$KV.b.>", "prod.orders.>", false},
      {"$KV.b.>", ">", true},
      {"$JS.API.>", "$JS.*.STREAM.INFO.x", true},
  };
  for (const auto& c : cases) {
    CAPTURE(c.a);
    CAPTURE(c.b);
    CHECK(subject::overlaps(c.a, c.b) == c.expected);
    CHECK(subject::overlaps(c.b, c.a) == c.expected);
  }
}

TEST_CASE("overlaps is symmetric and reflexive over a table of filters") {
  const std::vector<std::string_view> filters = {
      "a",     "b",       "*",       ">",       "a.b",     "a.*",     "*.b",     "*.*",   "a.>",
      "*.>",   "b.>",     "a.b.c",   "a.*.c",   "a.b.*",   "*.*.*",   "a.*.>",   "*.b.>", "a.b.>",
      "a.b.c.d", "*.*.*.*", "a.*.*.>", "x.y",   "prod.orders.>", "prod.*.order.created",
      "prod.orders.order.created", "prod.events.>", "dlq.prod.orders.>", "$KV.b.>"};
  for (const auto a : filters) {
    CAPTURE(a);
    CHECK(subject::overlaps(a, a));
    for (const auto b : filters) {
      CAPTURE(b);
      CHECK(subject::overlaps(a, b) == subject::overlaps(b, a));
    }
  }
}

TEST_CASE("covers: known relations") {
  struct Case {
    std::string_view outer, inner;
    bool expected;
  };
  const std::vector<Case> cases = {
      {"a", "a", true},
      {"a", "b", false},
      {"*", "a", true},
      {"a", "*", false},
      {"*", "*", true},
      {"*", ">", false},
      {">", "*", true},
      {">", ">", true},
      {">", "a.b.c", true},
      {">", "*.>", true},
      {"*.>", ">", false},
      {"a.>", "a.b", true},
      {"a.>", "a.*", true},
      {"a.>", "a.>", true},
      {"a.>", "a.b.>", true},
      {"a.>", "a.*.c.>", true},
      {"a.>", "a", false},
      {"a.>", "*.b", false},
      {"a.b.>", "a.>", false},
      {"a.*", "a.>", false},
      {"a.*", "a.b", true},
      {"a.*", "a.b.c", false},
      {"a.*.c", "a.b.c", true},
      {"a.*.c", "a.*.c", true},
      {"a.b.c", "a.*.c", false},
      {"*.*", "a.b", true},
      {"*.*", "a", false},
      {"a.*.>", "a.b.c", true},
      {"a.*.>", "a.b", false},
      {"a.*.>", "a.b.>", true},
      {"*.*.>", "a.>", false},
      // An app's stream captures every topic of the app, and a shared stream captures the app's.
      {"prod.orders.>", "prod.orders.order.created", true},
      {"prod.orders.>", "prod.orders.order.*", true},
      {"prod.orders.>", "prod.*.order.created", false},
      {"prod.>", "prod.orders.>", true},
      {"prod.orders.>", "prod.>", false},
  };
  for (const auto& c : cases) {
    CAPTURE(c.outer);
    CAPTURE(c.inner);
    CHECK(subject::covers(c.outer, c.inner) == c.expected);
    if (c.expected) {
      // Whatever covers also overlaps: every filter matches at least one subject.
      CHECK(subject::overlaps(c.outer, c.inner));
    }
  }
}

TEST_CASE("matches, overlaps and covers agree with enumeration over a small universe") {
  // Filters: up to 4 tokens over {a, b, *}, optionally ending in '>' (160 filters).
  // Subjects: every literal of 1 to 5 tokens over {a, b, c} (363 subjects). The universe is large
  // enough to decide both relations for these filters: two filters that overlap share a subject
  // no longer than the longer filter (<= 4 tokens, '>' taking one), and a subject that inner
  // matches but outer does not can be found with at most 5 tokens (one past outer's fixed length).
  // 'c' appears in no filter, so it is what tells '*' and '>' apart from the literals.
  const std::vector<std::string> filter_tokens = {"a", "b", "*"};
  const std::vector<std::string> literal_tokens = {"a", "b", "c"};

  std::vector<std::string> subjects;
  std::function<void(std::vector<std::string>&, std::size_t)> grow_subjects = [&](std::vector<std::string>& prefix,
                                                                                  std::size_t max_len) {
    if (!prefix.empty()) {
      subjects.push_back(join(prefix));
    }
    if (prefix.size() == max_len) {
      return;
    }
    for (const auto& t : literal_tokens) {
      prefix.push_back(t);
      grow_subjects(prefix, max_len);
      prefix.pop_back();
    }
  };
  std::vector<std::string> prefix;
  grow_subjects(prefix, 5);
  REQUIRE(subjects.size() == 363);

  std::vector<std::string> filters;
  std::function<void(std::vector<std::string>&, std::size_t)> grow_filters = [&](std::vector<std::string>& head,
                                                                                 std::size_t max_len) {
    if (!head.empty()) {
      filters.push_back(join(head));
    }
    if (head.size() + 1 <= max_len) {
      head.push_back(">");
      filters.push_back(join(head));
      head.pop_back();
    }
    if (head.size() == max_len) {
      return;
    }
    for (const auto& t : filter_tokens) {
      head.push_back(t);
      grow_filters(head, max_len);
      head.pop_back();
    }
  };
  std::vector<std::string> head;
  grow_filters(head, 4);
  // Filters ending at length 4 with '>' come from heads of length 3; heads of length 4 add none.
  REQUIRE(filters.size() == 160);

  constexpr std::size_t kSubjects = 363;
  std::vector<std::bitset<kSubjects>> matched(filters.size());
  std::vector<std::string> mismatches;
  for (std::size_t f = 0; f < filters.size(); ++f) {
    const auto ftokens = subject::tokens(filters[f]);
    for (std::size_t s = 0; s < subjects.size(); ++s) {
      const bool got = subject::matches(filters[f], subjects[s]);
      if (got != reference_match(ftokens, 0, subject::tokens(subjects[s]), 0)) {
        mismatches.push_back("matches(" + filters[f] + ", " + subjects[s] + ")");
      }
      matched[f][s] = got;
    }
    CHECK_MESSAGE(matched[f].any(), "filter matches nothing in the universe: " << filters[f]);
  }

  std::size_t pairs = 0;
  std::size_t overlapping = 0;
  std::size_t covering = 0;
  for (std::size_t a = 0; a < filters.size(); ++a) {
    for (std::size_t b = 0; b < filters.size(); ++b) {
      ++pairs;
      const bool expect_overlap = (matched[a] & matched[b]).any();
      const bool expect_cover = (matched[b] & ~matched[a]).none();
      overlapping += expect_overlap ? 1 : 0;
      covering += expect_cover ? 1 : 0;
      if (subject::overlaps(filters[a], filters[b]) != expect_overlap) {
        mismatches.push_back("overlaps(" + filters[a] + ", " + filters[b] + ")");
      }
      if (subject::covers(filters[a], filters[b]) != expect_cover) {
        mismatches.push_back("covers(" + filters[a] + ", " + filters[b] + ")");
      }
    }
  }
  CHECK(pairs == 160 * 160);
  // Both relations must be exercised in both directions, or the check proves little.
  CHECK(overlapping > 0);
  CHECK(overlapping < pairs);
  CHECK(covering > filters.size());
  CHECK(covering < pairs);
  std::string first;
  for (std::size_t i = 0; i < mismatches.size() && i < 20; ++i) {
    first += "\n  " + mismatches[i];
  }
  CHECK_MESSAGE(mismatches.empty(), mismatches.size() << " disagreements, first:" << first);
}

TEST_CASE("to_name makes a filter safe for stream and consumer names") {
  CHECK(subject::to_name("prod.orders.>") == "prod_orders_all");
  CHECK(subject::to_name("prod.*.order.created") == "prod_any_order_created");
  CHECK(subject::to_name("*") == "any");
  CHECK(subject::to_name(">") == "all");
  CHECK(subject::to_name("a-b.c_d") == "a-b_c_d");
  CHECK(subject::to_name("orders") == "orders");

  for (const std::string_view filter : {"prod.*.>", "*.*.*", "a.b.c.d.e.f", "X-1.y_2.*"}) {
    CAPTURE(filter);
    const auto name = subject::to_name(filter);
    CHECK_FALSE(name.empty());
    CHECK(subject::is_valid_token(name));
  }
  for (const std::string_view bad : {"", "a..b", "a.>.b", "$KV.b.>", "a b", "a.\xc3\xa9"}) {
    CAPTURE(bad);
    CHECK(contains(error_of([&] { (void)subject::to_name(bad); }), "invalid filter"));
  }
  // Documented limit: the mapping is not one-to-one.
  CHECK(subject::to_name("a.b") == subject::to_name("a_b"));
}
