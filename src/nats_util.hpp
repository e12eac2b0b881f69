#pragma once
// Internal glue over cnats: ownership of its objects and the status -> exception mapping.
// Not installed.
#include <map>
#include <memory>
#include <string>
#include <string_view>

#include <nats/nats.h>

#include <natspubsub/error.hpp>

namespace natspubsub::detail {

template <typename T, void (*Destroy)(T*)>
struct CnatsDeleter {
  void operator()(T* p) const noexcept {
    if (p != nullptr) Destroy(p);
  }
};

using MsgPtr = std::unique_ptr<natsMsg, CnatsDeleter<natsMsg, natsMsg_Destroy>>;
using OptionsPtr = std::unique_ptr<natsOptions, CnatsDeleter<natsOptions, natsOptions_Destroy>>;
using ConnectionPtr = std::unique_ptr<natsConnection, CnatsDeleter<natsConnection, natsConnection_Destroy>>;
using JsPtr = std::unique_ptr<jsCtx, CnatsDeleter<jsCtx, jsCtx_Destroy>>;
using SubscriptionPtr = std::unique_ptr<natsSubscription, CnatsDeleter<natsSubscription, natsSubscription_Destroy>>;
using PubAckPtr = std::unique_ptr<jsPubAck, CnatsDeleter<jsPubAck, jsPubAck_Destroy>>;
using StreamInfoPtr = std::unique_ptr<jsStreamInfo, CnatsDeleter<jsStreamInfo, jsStreamInfo_Destroy>>;
using ConsumerInfoPtr = std::unique_ptr<jsConsumerInfo, CnatsDeleter<jsConsumerInfo, jsConsumerInfo_Destroy>>;
using AccountInfoPtr = std::unique_ptr<jsAccountInfo, CnatsDeleter<jsAccountInfo, jsAccountInfo_Destroy>>;

/// The text of the last cnats error on this thread, or the status text.
std::string last_error_text(natsStatus status);

/// Throws the exception type matching `status` (TimeoutError, NoRespondersError,
/// ConnectionError, AuthError, PublishError for publish contexts, else NatsError).
[[noreturn]] void throw_status(natsStatus status, std::string_view context, jsErrCode js_code = static_cast<jsErrCode>(0));

/// No-op on NATS_OK, else throw_status.
inline void check(natsStatus status, std::string_view context, jsErrCode js_code = static_cast<jsErrCode>(0)) {
  if (status != NATS_OK) throw_status(status, context, js_code);
}

/// Every header; repeated values of one key are joined with ", ".
std::map<std::string, std::string> read_headers(natsMsg* msg);

/// The body as a string (empty when there is none).
std::string body_of(natsMsg* msg);

/// Reads a header value (empty when absent).
std::string header(natsMsg* msg, const char* key);

}  // namespace natspubsub::detail
