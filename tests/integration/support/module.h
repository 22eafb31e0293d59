// A PKCS#11 module loaded and initialized for the lifetime of the object.
#pragma once

#include <p11mux/pkcs11.h>

#include <string>

namespace p11test {

class Module {
 public:
  // dlopens path, gets its function list and calls C_Initialize with
  // CKF_OS_LOCKING_OK. Throws std::runtime_error / CkError on failure.
  explicit Module(std::string path);
  // C_Finalize (unless finalize() was called) and dlclose.
  ~Module();
  // Copying would finalize and unload the module twice.
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  const CK_FUNCTION_LIST& fn() const noexcept { return *functions_; }
  const CK_FUNCTION_LIST* operator->() const noexcept { return functions_; }
  const std::string& path() const noexcept { return path_; }

  // C_Finalize now, for tests of the finalized state; the library stays loaded
  // (fn() remains callable) until destruction. Returns the module's answer.
  CK_RV finalize() noexcept;

 private:
  std::string path_;
  void* library_ = nullptr;
  CK_FUNCTION_LIST* functions_ = nullptr;
  bool initialized_ = false;
};

}  // namespace p11test
