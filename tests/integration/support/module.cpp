#include "module.h"

#include "ck_error.h"

#include <dlfcn.h>

#include <memory>
#include <stdexcept>

namespace p11test {
namespace {

struct DlClose {
  void operator()(void* library) const noexcept { ::dlclose(library); }
};

}  // namespace

Module::Module(std::string path) : path_(std::move(path)) {
  // Built in a unique_ptr so that a failure below still unloads the library.
  std::unique_ptr<void, DlClose> library(::dlopen(path_.c_str(), RTLD_NOW | RTLD_LOCAL));
  if (!library) throw std::runtime_error("dlopen " + path_ + ": " + ::dlerror());

  auto get_function_list =
      reinterpret_cast<CK_C_GetFunctionList>(::dlsym(library.get(), "C_GetFunctionList"));
  if (get_function_list == nullptr) {
    throw std::runtime_error(path_ + " has no C_GetFunctionList");
  }
  CK_FUNCTION_LIST* functions = nullptr;
  ck_check(get_function_list(&functions), "C_GetFunctionList");
  if (functions == nullptr) throw std::runtime_error(path_ + ": C_GetFunctionList gave NULL");

  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  ck_check(functions->C_Initialize(&args), "C_Initialize");

  library_ = library.release();
  functions_ = functions;
  initialized_ = true;
}

Module::~Module() {
  finalize();
  ::dlclose(library_);
}

CK_RV Module::finalize() noexcept {
  if (!initialized_) return CKR_CRYPTOKI_NOT_INITIALIZED;
  initialized_ = false;
  return functions_->C_Finalize(nullptr);
}

}  // namespace p11test
