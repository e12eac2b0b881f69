// libFuzzer target: subject validation, matching, overlap and naming on arbitrary strings.
// Input: two strings separated by the first '\n'. Invalid input must be a SubjectError; on valid
// input the algebra must hold (overlap symmetric, a filter matching a subject overlaps it, covers
// implies overlaps, a filter covers itself, to_name gives one valid token).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include <natspubsub/error.hpp>
#include <natspubsub/subject.hpp>

namespace subject = natspubsub::subject;

namespace {

bool valid_filter(std::string_view f) {
  try {
    subject::validate_filter(f);
    return true;
  } catch (const natspubsub::SubjectError&) {
    return false;
  }
}

bool valid_subject(std::string_view s) {
  try {
    subject::validate_subject(s);
    return true;
  } catch (const natspubsub::SubjectError&) {
    return false;
  }
}

void check(bool condition) {
  if (!condition) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view input(reinterpret_cast<const char*>(data), size);
  auto nl = input.find('\n');
  std::string_view a = input.substr(0, nl);
  std::string_view b = nl == std::string_view::npos ? std::string_view() : input.substr(nl + 1);

  (void)subject::tokens(a);
  (void)subject::is_valid_token(a);
  try {
    subject::validate_topic(a);
    subject::validate_token(b, "app");
    auto built = subject::build("env", b, a);
    check(valid_subject(built));
  } catch (const natspubsub::SubjectError&) {
  }

  // matches/overlaps/covers apply the server's rule (any bytes but blanks in a token), wider
  // than the library's [A-Za-z0-9_-] (validate_filter): they may accept what validate_filter
  // refuses, but must be consistent with one another on whatever they accept.
  try {
    bool ab = subject::overlaps(a, b);
    check(ab == subject::overlaps(b, a));
    check(subject::covers(a, a));
    if (subject::covers(a, b)) check(ab);
    if (valid_subject(b)) check(subject::matches(a, b) == subject::covers(a, b));
    if (valid_subject(b) && subject::matches(a, b)) check(ab);
  } catch (const natspubsub::SubjectError&) {
    check(!(valid_filter(a) && valid_filter(b)));  // what the library accepts, the server rule accepts
  }
  // to_name: defined exactly for library-valid filters, and yields a single valid token.
  try {
    auto name = subject::to_name(a);
    check(valid_filter(a));
    check(subject::is_valid_token(name));
  } catch (const natspubsub::SubjectError&) {
    check(!valid_filter(a));
  }
  return 0;
}
