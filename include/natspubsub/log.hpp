#pragma once
// The library logs through one named spdlog logger ("natspubsub"). Applications replace it to
// route the library's lines into their own sinks:
//
//   natspubsub::set_logger(spdlog::stdout_color_mt("natspubsub"));
#include <memory>

#include <spdlog/logger.h>

namespace natspubsub {

/// The logger the library writes to; created on first use (stderr sink, "natspubsub" name).
[[nodiscard]] std::shared_ptr<spdlog::logger> logger();

/// Replaces the library's logger. Passing nullptr restores the default.
void set_logger(std::shared_ptr<spdlog::logger> logger);

}  // namespace natspubsub
