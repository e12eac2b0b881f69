// libFuzzer target: the configuration JSON. Arbitrary text is parsed; a JSON value goes through
// Config::from_json. Anything it refuses must be a natspubsub::Error (ConfigError naming the
// field), never a crash or a raw library exception; what it accepts must survive
// to_json -> from_json unchanged, and validate() must answer with ConfigError or nothing.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include <nlohmann/json.hpp>

#include <natspubsub/config.hpp>
#include <natspubsub/error.hpp>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto j = nlohmann::json::parse(data, data + size, nullptr, false);
  if (j.is_discarded()) return 0;  // not JSON: the JSON parser's business, not ours
  natspubsub::Config config;
  try {
    config = natspubsub::Config::from_json(j);
  } catch (const natspubsub::Error&) {
    return 0;
  }
  try {
    config.validate();
  } catch (const natspubsub::ConfigError&) {
  }
  (void)config.redacted_json().dump();
  auto round = natspubsub::Config::from_json(config.to_json());
  if (round.to_json() != config.to_json()) std::abort();
  return 0;
}
