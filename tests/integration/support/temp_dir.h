// A private temporary directory, removed with its contents on destruction.
#pragma once

#include <filesystem>
#include <string>

namespace p11test {

class TempDir {
 public:
  // Creates $TMPDIR/<prefix>XXXXXX (or /tmp/...) with mode 0700.
  explicit TempDir(const std::string& prefix);
  ~TempDir();
  // Copying would remove the directory twice.
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::filesystem::path& path() const noexcept { return path_; }

 private:
  std::filesystem::path path_;
};

}  // namespace p11test
