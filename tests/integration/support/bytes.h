// Byte strings as the tests pass them to and from PKCS#11.
#pragma once

#include <p11mux/pkcs11.h>

#include <string>
#include <string_view>
#include <vector>

namespace p11test {

using Bytes = std::vector<CK_BYTE>;

Bytes to_bytes(std::string_view text);
// Lower-case hex, no separators.
std::string to_hex(const Bytes& bytes);
// Parses hex digits (either case); throws std::invalid_argument on odd length or non-hex.
Bytes from_hex(std::string_view hex);

}  // namespace p11test
