#include "shared_library.hpp"

#include <p11mux/ckr_error.hpp>

#include <dlfcn.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>

namespace p11mux {

SharedLibrary::SharedLibrary(const std::string& path) {
  // dlopen's message for a missing file is cryptic about which file it means;
  // say it plainly first. (A bare name is searched for by dlopen itself.)
  struct stat st {};
  if (path.find('/') != std::string::npos && ::stat(path.c_str(), &st) != 0) {
    throw CkrError(CKR_GENERAL_ERROR,
                   "cannot load backend module '" + path + "': " + std::strerror(errno));
  }
  handle_ = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle_ == nullptr) {
    const char* why = ::dlerror();
    throw CkrError(CKR_GENERAL_ERROR, "cannot load backend module '" + path +
                                          "': " + (why != nullptr ? why : "unknown dlopen error"));
  }
}

SharedLibrary::~SharedLibrary() {
  if (handle_ != nullptr) ::dlclose(handle_);
}

void* SharedLibrary::symbol(const char* name) const noexcept {
  if (lookup_ != nullptr) return lookup_(name);
  return handle_ != nullptr ? ::dlsym(handle_, name) : nullptr;
}

}  // namespace p11mux
