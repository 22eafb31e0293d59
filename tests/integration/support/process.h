// Running a helper program (softhsm2-util) without a shell.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

namespace p11test {

// Runs argv[0] (searched in PATH) with argv, the current environment, stdin from
// /dev/null and stdout+stderr appended to log. Returns the exit status; throws
// std::runtime_error if it could not be started or died from a signal.
int run_process(const std::vector<std::string>& argv, const std::filesystem::path& log);

}  // namespace p11test
