#pragma once
#include <string_view>

namespace natspubsub {
/// The library version, e.g. "0.1.0".
[[nodiscard]] std::string_view version() noexcept;
}  // namespace natspubsub
