// C_GetInfo: p11mux describes itself (dispatch `handled`), once per function list.
#include "entry/entry_points.hpp"
#include "handled/handled.hpp"

#include <p11mux/version.h>

#include <algorithm>
#include <cstring>

namespace p11mux {
namespace {

// PKCS#11 strings are blank-padded, not NUL-terminated.
template <std::size_t N>
void set_padded(CK_UTF8CHAR (&field)[N], std::string_view text) {
  std::memset(field, ' ', N);
  std::memcpy(field, text.data(), std::min(N, text.size()));
}

// The cryptoki version is that of the function list the call came through.
void describe(CK_INFO& info, CK_VERSION cryptoki) noexcept {
  info = CK_INFO{};
  info.cryptokiVersion = cryptoki;
  set_padded(info.manufacturerID, "p11mux");
  set_padded(info.libraryDescription, "p11mux PKCS#11 multiplexer");
  info.libraryVersion = CK_VERSION{P11MUX_VERSION_MAJOR, P11MUX_VERSION_MINOR};
}

}  // namespace

CK_RV get_info(Runtime&, CK_INFO_PTR info) noexcept {
  describe(*info, entry_points::function_list()->version);
  return CKR_OK;
}

CK_RV get_info_3_0(Runtime&, CK_INFO_PTR info) noexcept {
  describe(*info, entry_points::function_list_3_0()->version);
  return CKR_OK;
}

}  // namespace p11mux
