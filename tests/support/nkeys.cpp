#include "nkeys.hpp"

#include <array>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <vector>

namespace natspubsub::testing {
namespace {

using Bytes = std::vector<std::uint8_t>;

constexpr std::uint8_t kPrefixSeed = 18 << 3;  // 'S'
constexpr std::uint8_t kPrefixUser = 20 << 3;  // 'U'
constexpr const char* kBase32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
// DER of an Ed25519 PKCS#8 private key and of a SubjectPublicKeyInfo end with the raw 32 bytes;
// this is the private key's header before them.
constexpr std::array<std::uint8_t, 16> kPkcs8Ed25519Header{0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06,
                                                           0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20};

std::uint16_t crc16_xmodem(const Bytes& data) {
  std::uint16_t crc = 0;
  for (auto b : data) {
    crc ^= static_cast<std::uint16_t>(b) << 8;
    for (int i = 0; i < 8; ++i) crc = (crc & 0x8000) ? static_cast<std::uint16_t>((crc << 1) ^ 0x1021) : crc << 1;
  }
  return crc;
}

std::string base32(const Bytes& data) {
  std::string out;
  unsigned buffer = 0;
  int bits = 0;
  for (auto b : data) {
    buffer = (buffer << 8) | b;
    bits += 8;
    while (bits >= 5) {
      out += kBase32[(buffer >> (bits - 5)) & 31];
      bits -= 5;
    }
  }
  if (bits > 0) out += kBase32[(buffer << (5 - bits)) & 31];
  return out;
}

Bytes unbase32(const std::string& text) {
  Bytes out;
  unsigned buffer = 0;
  int bits = 0;
  for (char c : text) {
    const char* p = std::char_traits<char>::find(kBase32, 32, c);
    if (p == nullptr) throw std::invalid_argument("nkey: not base32");
    buffer = (buffer << 5) | static_cast<unsigned>(p - kBase32);
    bits += 5;
    if (bits >= 8) {
      out.push_back(static_cast<std::uint8_t>(buffer >> (bits - 8)));
      bits -= 8;
    }
  }
  return out;
}

std::string encode(Bytes raw) {
  const auto crc = crc16_xmodem(raw);
  raw.push_back(static_cast<std::uint8_t>(crc & 0xff));
  raw.push_back(static_cast<std::uint8_t>(crc >> 8));
  return base32(raw);
}

std::string encode_user_seed(const Bytes& key) {
  Bytes raw{static_cast<std::uint8_t>(kPrefixSeed | (kPrefixUser >> 5)), static_cast<std::uint8_t>((kPrefixUser & 31) << 3)};
  raw.insert(raw.end(), key.begin(), key.end());
  return encode(raw);
}

std::string encode_user_public(const Bytes& key) {
  Bytes raw{kPrefixUser};
  raw.insert(raw.end(), key.begin(), key.end());
  return encode(raw);
}

Bytes read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

Bytes last_32(const Bytes& der, const char* what) {
  if (der.size() < 32) throw std::runtime_error(std::string("nkey: openssl gave no ") + what);
  return Bytes(der.end() - 32, der.end());
}

void openssl(const std::string& args) {
  auto r = run_command("openssl " + args);
  if (r.status != 0) throw std::runtime_error("openssl " + args + " failed: " + r.error);
}

// The raw public key of the PKCS#8 DER private key at `der`.
Bytes public_of(const std::filesystem::path& der, const TempDir& dir) {
  const auto pub = dir.path() / "nkey-public.der";
  openssl("pkey -inform DER -in '" + der.string() + "' -pubout -outform DER -out '" + pub.string() + "'");
  return last_32(read_file(pub), "public key");
}

}  // namespace

NkeyPair generate_user_nkey(const TempDir& dir) {
  const auto der = dir.path() / "nkey-private.der";
  openssl("genpkey -algorithm ed25519 -outform DER -out '" + der.string() + "'");
  const auto seed = last_32(read_file(der), "private key");
  return {encode_user_seed(seed), encode_user_public(public_of(der, dir))};
}

std::string user_public_key_of(const std::string& seed, const TempDir& dir) {
  const Bytes raw = unbase32(seed);
  if (raw.size() != 36 || raw[0] != (kPrefixSeed | (kPrefixUser >> 5)) || raw[1] != ((kPrefixUser & 31) << 3))
    throw std::invalid_argument("nkey: not a user seed");
  const Bytes body(raw.begin(), raw.end() - 2);
  if (crc16_xmodem(body) != (raw[34] | (raw[35] << 8))) throw std::invalid_argument("nkey: bad checksum");
  Bytes der(kPkcs8Ed25519Header.begin(), kPkcs8Ed25519Header.end());
  der.insert(der.end(), raw.begin() + 2, raw.begin() + 34);
  const auto path = dir.path() / "nkey-from-seed.der";
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(der.data()), static_cast<std::streamsize>(der.size()));
  return encode_user_public(public_of(path, dir));
}

}  // namespace natspubsub::testing
