// A fixed environment for the configuration's unit tests: a getenv stand-in
// over a map, and the list of names it holds (for the misspelling check).
#pragma once

#include "config/config.hpp"

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace p11mux {

using EnvMap = std::map<std::string, std::string>;

// The std::functions share the map, so the returned pointers live as long as
// the environment does.
inline Environment env_from(EnvMap vars = {}) {
  auto shared = std::make_shared<const EnvMap>(std::move(vars));
  return {[shared](const char* name) -> const char* {
            const auto it = shared->find(name);
            return it == shared->end() ? nullptr : it->second.c_str();
          },
          [shared] {
            std::vector<std::string> names;
            for (const auto& entry : *shared) names.push_back(entry.first);
            return names;
          }};
}

}  // namespace p11mux
