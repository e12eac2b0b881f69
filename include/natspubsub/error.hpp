#pragma once
// The exception tree of natspubsub. Every failure a caller can act on has its own type;
// per-message outcomes (batch publish results) are values, not exceptions.
//
//   try { publisher.publish("order.created", body); }
//   catch (const natspubsub::TimeoutError& e) { /* retry later */ }
//   catch (const natspubsub::Error& e) { spdlog::error("{}", e.what()); }
#include <stdexcept>
#include <string>

namespace natspubsub {

/// Root of every exception the library throws.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A configuration value breaks a rule. `field()` names it (e.g. "servers[1]", "env").
class ConfigError : public Error {
 public:
  ConfigError(std::string field, std::string rule)
      : Error("invalid configuration: " + field + ": " + rule), field_(std::move(field)), rule_(std::move(rule)) {}
  [[nodiscard]] const std::string& field() const noexcept { return field_; }
  [[nodiscard]] const std::string& rule() const noexcept { return rule_; }

 private:
  std::string field_;
  std::string rule_;
};

/// A subject, token or subject filter is not valid.
class SubjectError : public Error {
 public:
  using Error::Error;
};

/// A body could not be decoded as an envelope (or an envelope could not be encoded).
class EnvelopeError : public Error {
 public:
  enum class Kind { malformed_json, not_an_object, missing_field, wrong_type, invalid_value };
  EnvelopeError(Kind kind, std::string field, const std::string& message)
      : Error(message), kind_(kind), field_(std::move(field)) {}
  [[nodiscard]] Kind kind() const noexcept { return kind_; }
  /// The field at fault; empty for malformed_json and not_an_object.
  [[nodiscard]] const std::string& field() const noexcept { return field_; }

 private:
  Kind kind_;
  std::string field_;
};

/// A cnats call failed. Keeps the cnats status and, for JetStream API errors, the jsErrCode
/// (10059 stream not found, 10014 consumer not found, 10071 wrong last sequence, ...).
class NatsError : public Error {
 public:
  NatsError(const std::string& message, int status, int js_error_code = 0)
      : Error(message), status_(status), js_error_code_(js_error_code) {}
  /// The cnats `natsStatus` value.
  [[nodiscard]] int status() const noexcept { return status_; }
  /// The JetStream `jsErrCode` value, 0 when the server sent none.
  [[nodiscard]] int js_error_code() const noexcept { return js_error_code_; }

 private:
  int status_;
  int js_error_code_;
};

/// Connecting failed, or the connection is closed.
class ConnectionError : public NatsError {
 public:
  using NatsError::NatsError;
};

/// The server refused our credentials. The message never contains the secret.
class AuthError : public ConnectionError {
 public:
  using ConnectionError::ConnectionError;
};

/// A request or a publish got no answer in time.
class TimeoutError : public NatsError {
 public:
  using NatsError::NatsError;
};

/// A request found nobody listening on its subject.
class NoRespondersError : public NatsError {
 public:
  using NatsError::NatsError;
};

/// Streams or consumers could not be made as asked.
class TopologyError : public Error {
 public:
  using Error::Error;
};

/// A stream's subjects overlap those of another stream; both names are in the message.
class OverlapError : public TopologyError {
 public:
  OverlapError(const std::string& message, std::string stream, std::string other_stream)
      : TopologyError(message), stream_(std::move(stream)), other_stream_(std::move(other_stream)) {}
  [[nodiscard]] const std::string& stream() const noexcept { return stream_; }
  [[nodiscard]] const std::string& other_stream() const noexcept { return other_stream_; }

 private:
  std::string stream_;
  std::string other_stream_;
};

/// A publish was refused (payload too large, no stream for the subject, wrong last sequence, ...).
class PublishError : public NatsError {
 public:
  using NatsError::NatsError;
};

/// Thrown by a handler when retrying cannot help (invalid order, unknown customer): the consumer
/// runtime sends the message to the DLQ at once instead of retrying it.
///
///   if (!order.contains("amount")) throw natspubsub::PermanentError("order without amount");
class PermanentError : public Error {
 public:
  using Error::Error;
};

}  // namespace natspubsub

namespace natspubsub {

/// A responder answered a request with an error. `code()` follows the NATS service API
/// (`Nats-Service-Error-Code`): 500 when its handler failed, 503 when it is unavailable (its
/// circuit is open), 400 when it could not read the request; `remote_message()` is the text it
/// sent. A handler may also throw one to answer with its own code:
///
///   throw natspubsub::RemoteError(404, "unknown sku " + sku);
///   ...
///   catch (const natspubsub::RemoteError& e) { if (e.code() == 404) ...; }
class RemoteError : public Error {
 public:
  static constexpr int kHandlerFailed = 500;
  static constexpr int kUnavailable = 503;
  static constexpr int kBadRequest = 400;

  RemoteError(int code, std::string remote_message, std::string subject = {}, std::string message_id = {})
      : Error("remote error " + std::to_string(code) + (subject.empty() ? "" : " from " + subject) + ": " +
              remote_message),
        code_(code),
        remote_message_(std::move(remote_message)),
        subject_(std::move(subject)),
        message_id_(std::move(message_id)) {}
  [[nodiscard]] int code() const noexcept { return code_; }
  /// The responder's error text, as it sent it.
  [[nodiscard]] const std::string& remote_message() const noexcept { return remote_message_; }
  /// The subject the request went to (empty when thrown by a handler).
  [[nodiscard]] const std::string& subject() const noexcept { return subject_; }
  /// The message id of the request that failed.
  [[nodiscard]] const std::string& message_id() const noexcept { return message_id_; }
  /// True for 503: the responder is up but refuses work for now; trying later may succeed.
  [[nodiscard]] bool unavailable() const noexcept { return code_ == kUnavailable; }

 private:
  int code_;
  std::string remote_message_;
  std::string subject_;
  std::string message_id_;
};

}  // namespace natspubsub
