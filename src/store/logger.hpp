#pragma once
// The store's logger: the library's named logger (natspubsub/log.hpp) where that component is
// present, else the application's "natspubsub" spdlog logger or spdlog's default one.
#include <memory>

#include <spdlog/spdlog.h>

#if __has_include(<natspubsub/log.hpp>)
#include <natspubsub/log.hpp>
#define NATSPUBSUB_STORE_HAS_LOG 1
#endif

namespace natspubsub::store::detail {

inline std::shared_ptr<spdlog::logger> logger() {
#ifdef NATSPUBSUB_STORE_HAS_LOG
  return natspubsub::logger();
#else
  auto named = spdlog::get("natspubsub");
  return named ? named : spdlog::default_logger();
#endif
}

}  // namespace natspubsub::store::detail
