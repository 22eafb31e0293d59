// LD_PRELOAD shim that makes p11-kit (and so p11-kit-proxy.so) load only the
// modules described in one directory, for benchmarking the proxy in front of
// SoftHSM2 alone:
//   P11KIT_ISOLATE_MODULES=DIR LD_PRELOAD=libp11kit-isolate.so program ...
// DIR holds *.module files ("module: /usr/lib/softhsm/libsofthsm2.so").
//
// Why a shim: p11-kit has no environment variable for its module directories,
// and it ignores the user's configuration (~/.config/pkcs11) when running as
// root, so the system's modules (/usr/share/p11-kit/modules: OpenSC and others)
// would be loaded too. p11_kit_override_system_files() is p11-kit's own hook
// for this (its test suite uses it); it must run before the first module load,
// hence a constructor. The shim links libp11-kit.so.0, which is the same file
// as p11-kit-proxy.so, so the dynamic loader keeps a single instance of it.
#define P11_KIT_FUTURE_UNSTABLE_API 1
#include <p11-kit/p11-kit.h>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace {

__attribute__((constructor)) void isolate_p11kit() {
  const char* dir = std::getenv("P11KIT_ISOLATE_MODULES");
  if (dir == nullptr || *dir == '\0') {
    std::fprintf(stderr,
                 "p11kit-isolate: P11KIT_ISOLATE_MODULES is not set; p11-kit is not isolated\n");
    return;
  }
  // Static: p11-kit keeps the pointers. The configuration files need not exist
  // (then p11-kit uses its defaults); only DIR's modules are found.
  static const std::string modules = dir;
  static const std::string none = modules + "/.none";
  p11_kit_override_system_files(none.c_str(), none.c_str(), modules.c_str(), none.c_str(),
                                none.c_str());
}

}  // namespace
