#pragma once
// Internal (not installed): shows untrusted text inside error messages.
//
// Error messages end up in logs and in NATS headers (the DLQ reason), so bytes taken from a
// subject or a message body are escaped: a newline, a NUL or a stray non-UTF-8 byte from the
// input must never reach a header or split a log line. Long input is cut, so a 1 MiB body
// cannot become a 4 MiB error message.
#include <cstddef>
#include <string>
#include <string_view>

namespace natspubsub::detail {

/// `text` with every byte outside printable ASCII escaped (\n, \t, \r, \\, \", \xNN), at most
/// `max_bytes` input bytes shown; a cut is marked with "..." and the full length.
inline std::string printable(std::string_view text, std::size_t max_bytes = 80) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(text.size() < max_bytes ? text.size() : max_bytes);
  const std::size_t shown = text.size() < max_bytes ? text.size() : max_bytes;
  for (std::size_t i = 0; i < shown; ++i) {
    const auto byte = static_cast<unsigned char>(text[i]);
    switch (byte) {
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      case '\\': out += "\\\\"; break;
      case '"': out += "\\\""; break;
      default:
        if (byte < 0x20 || byte >= 0x7f) {
          out += "\\x";
          out += kHex[byte >> 4];
          out += kHex[byte & 0x0f];
        } else {
          out += static_cast<char>(byte);
        }
    }
  }
  if (shown < text.size()) {
    out += "... (" + std::to_string(text.size()) + " bytes)";
  }
  return out;
}

/// printable(text) in double quotes.
inline std::string quoted(std::string_view text, std::size_t max_bytes = 80) {
  return '"' + printable(text, max_bytes) + '"';
}

}  // namespace natspubsub::detail
