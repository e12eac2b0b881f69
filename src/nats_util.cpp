#include "nats_util.hpp"

#include <cstdlib>

namespace natspubsub::detail {

std::map<std::string, std::string> read_headers(natsMsg* msg) {
  std::map<std::string, std::string> out;
  const char** keys = nullptr;
  int count = 0;
  if (natsMsgHeader_Keys(msg, &keys, &count) != NATS_OK) return out;
  for (int i = 0; i < count; ++i) {
    const char** values = nullptr;
    int n = 0;
    if (natsMsgHeader_Values(msg, keys[i], &values, &n) != NATS_OK) continue;
    std::string joined;
    for (int k = 0; k < n; ++k) joined += (k ? ", " : "") + std::string(values[k] != nullptr ? values[k] : "");
    out[keys[i]] = std::move(joined);
    std::free(static_cast<void*>(values));  // the array is ours, the strings stay the message's
  }
  std::free(static_cast<void*>(keys));
  return out;
}

std::string body_of(natsMsg* msg) {
  const char* data = natsMsg_GetData(msg);
  const int len = natsMsg_GetDataLength(msg);
  return data != nullptr && len > 0 ? std::string(data, static_cast<size_t>(len)) : std::string();
}

std::string last_error_text(natsStatus status) {
  natsStatus last = NATS_OK;
  const char* text = nats_GetLastError(&last);
  if (text != nullptr && *text != '\0' && last == status) {
    // cnats prefixes its source location, "(conn.c:2088): ": not useful to a reader.
    std::string_view t(text);
    if (t.front() == '(') {
      auto end = t.find("): ");
      if (end != std::string_view::npos) t.remove_prefix(end + 3);
    }
    return std::string(t);
  }
  return natsStatus_GetText(status);
}

void throw_status(natsStatus status, std::string_view context, jsErrCode js_code) {
  std::string message(context);
  message += ": ";
  message += last_error_text(status);
  if (js_code != 0) message += " (jsErrCode " + std::to_string(static_cast<int>(js_code)) + ")";
  const int code = static_cast<int>(js_code);
  switch (status) {
    case NATS_TIMEOUT:
      throw TimeoutError(message, status, code);
    case NATS_NO_RESPONDERS:
      throw NoRespondersError(message, status, code);
    case NATS_CONNECTION_AUTH_FAILED:
      throw AuthError(message, status, code);
    case NATS_NO_SERVER:
    case NATS_CONNECTION_CLOSED:
    case NATS_CONNECTION_DISCONNECTED:
    case NATS_NOT_YET_CONNECTED:
    case NATS_SSL_ERROR:
    case NATS_STALE_CONNECTION:
    case NATS_IO_ERROR:
      throw ConnectionError(message, status, code);
    case NATS_MAX_PAYLOAD:
      throw PublishError(message, status, code);
    default:
      throw NatsError(message, status, code);
  }
}

std::string header(natsMsg* msg, const char* key) {
  const char* value = nullptr;
  if (natsMsgHeader_Get(msg, key, &value) == NATS_OK && value != nullptr) return value;
  return {};
}

}  // namespace natspubsub::detail
