// libFuzzer target: reading dead letters. The input is the x-dlq-context header value (first line)
// and the body (the rest). parse_dead_letter must accept it or throw DlqFormatError; base64 must
// round-trip; a context that parses must serialise and parse back to the same JSON.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include <natspubsub/dlq.hpp>
#include <natspubsub/error.hpp>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view input(reinterpret_cast<const char*>(data), size);
  auto nl = input.find('\n');
  std::string context(input.substr(0, nl));
  std::string_view body = nl == std::string_view::npos ? std::string_view() : input.substr(nl + 1);

  natspubsub::Headers headers{{natspubsub::kDlqContextHeader, context}, {"x-dead-letter", "true"},
                              {natspubsub::kDlqReasonHeader, "permanent_error"}, {"x-deliveries", "1"}};
  try {
    auto letter = natspubsub::parse_dead_letter("dlq.test.app.test.orders.x", body, headers);
    auto j = letter.context.to_json();
    auto back = natspubsub::DlqContext::from_json(j);
    if (back.to_json() != j) std::abort();
  } catch (const natspubsub::DlqFormatError&) {
  }

  try {
    auto decoded = natspubsub::base64_decode(input);
    (void)decoded;
  } catch (const natspubsub::DlqFormatError&) {
  }
  if (natspubsub::base64_decode(natspubsub::base64_encode(input)) != input) std::abort();
  return 0;
}
