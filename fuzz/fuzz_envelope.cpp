// libFuzzer target: Envelope::decode on arbitrary bytes. The contract (DESIGN.md): malformed input
// gets a typed EnvelopeError, never a crash or another exception type; and what decodes
// re-encodes to something that decodes to the same envelope.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include <natspubsub/envelope.hpp>
#include <natspubsub/error.hpp>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view body(reinterpret_cast<const char*>(data), size);
  natspubsub::Envelope envelope;
  try {
    envelope = natspubsub::Envelope::decode(body);
  } catch (const natspubsub::EnvelopeError&) {
    return 0;  // refused with the typed error: fine
  }
  // Accepted: encoding must work (decode accepted it, so encode's checks must too) and be stable.
  auto again = natspubsub::Envelope::decode(envelope.encode());
  if (!(again == envelope)) std::abort();
  return 0;
}
