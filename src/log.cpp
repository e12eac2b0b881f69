#include <natspubsub/log.hpp>

#include <mutex>

#include <spdlog/sinks/stdout_color_sinks.h>

namespace natspubsub {
namespace {

std::mutex logger_mutex;
std::shared_ptr<spdlog::logger> current_logger;

std::shared_ptr<spdlog::logger> make_default_logger() {
  auto sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
  auto made = std::make_shared<spdlog::logger>("natspubsub", std::move(sink));
  made->set_level(spdlog::level::info);
  return made;
}

}  // namespace

std::shared_ptr<spdlog::logger> logger() {
  std::lock_guard lock(logger_mutex);
  if (!current_logger) current_logger = make_default_logger();
  return current_logger;
}

void set_logger(std::shared_ptr<spdlog::logger> replacement) {
  std::lock_guard lock(logger_mutex);
  current_logger = replacement ? std::move(replacement) : make_default_logger();
}

}  // namespace natspubsub
