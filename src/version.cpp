#include <natspubsub/version.hpp>

namespace natspubsub {
std::string_view version() noexcept { return NATSPUBSUB_VERSION; }
}  // namespace natspubsub
