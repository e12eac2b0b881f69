#pragma once
// Captures everything the library logs (every level) while alive, so a test can assert that no
// secret ever reaches a log line. Restores the default logger on destruction.
//
//   natspubsub::testing::LogCapture logs;
//   ... connect with a wrong password ...
//   CHECK(logs.text().find("hunter2") == std::string::npos);
#include <memory>
#include <mutex>
#include <string>

#include <spdlog/logger.h>
#include <spdlog/sinks/base_sink.h>

#include <natspubsub/log.hpp>

namespace natspubsub::testing {

class LogCapture {
 public:
  LogCapture() : sink_(std::make_shared<Sink>()) {
    auto logger = std::make_shared<spdlog::logger>("natspubsub", sink_);
    logger->set_level(spdlog::level::trace);
    natspubsub::set_logger(logger);
  }
  ~LogCapture() { natspubsub::set_logger(nullptr); }
  LogCapture(const LogCapture&) = delete;
  LogCapture& operator=(const LogCapture&) = delete;

  /// Everything logged so far, formatted as the default logger would (one line per record).
  [[nodiscard]] std::string text() const { return sink_->text(); }

 private:
  // Lines are appended under the sink's lock and read under ours: cnats threads log too.
  class Sink : public spdlog::sinks::base_sink<std::mutex> {
   public:
    std::string text() const {
      std::lock_guard lock(text_mutex_);
      return text_;
    }

   protected:
    void sink_it_(const spdlog::details::log_msg& msg) override {
      spdlog::memory_buf_t formatted;
      formatter_->format(msg, formatted);
      std::lock_guard lock(text_mutex_);
      text_.append(formatted.data(), formatted.size());
    }
    void flush_() override {}

   private:
    mutable std::mutex text_mutex_;
    std::string text_;
  };
  std::shared_ptr<Sink> sink_;
};

}  // namespace natspubsub::testing
