#pragma once
// Shared by the PostgreSQL outbox's lease claims (postgres_outbox.cpp) and held claims
// (postgres_held_claims.cpp). Not installed.
#include <cstdint>
#include <span>
#include <string>

namespace natspubsub::detail {

// "NPSBOUTB" in ASCII: the advisory lock lease claims take exclusive for each claim and
// transition, and held batches take shared while they are open (postgres_held_claims.hpp).
inline constexpr std::int64_t kOutboxClaimLock = 0x4e5053424f555442;

/// `{1,2,3}`: a bigint[] literal, how a batch of ids travels as one statement parameter.
inline std::string pg_bigint_array(std::span<const std::int64_t> ids) {
  std::string out = "{";
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (i != 0) out += ',';
    out += std::to_string(ids[i]);
  }
  return out + "}";
}

}  // namespace natspubsub::detail
