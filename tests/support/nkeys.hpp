// Fresh NATS user nkey pairs for tests, made at test time: an Ed25519 key from the openssl
// command line, written in the nkey text form (prefix byte, key, CRC-16/XMODEM, base32 without
// padding) that nats-server and cnats read. No nk tool needed.
#pragma once

#include <string>

#include "servers.hpp"

namespace natspubsub::testing {

struct NkeyPair {
  std::string seed;        ///< "SU…", 58 characters: what a seed file holds
  std::string public_key;  ///< "U…", 56 characters: what the server's config lists
};

/// A new user pair; `dir` holds openssl's scratch files.
NkeyPair generate_user_nkey(const TempDir& dir);

/// The public key of a user seed ("SU…"), computed with openssl; throws on a malformed seed.
std::string user_public_key_of(const std::string& seed, const TempDir& dir);

}  // namespace natspubsub::testing
