#!/usr/bin/env bash
# Builds the Debian package from a clean Release build directory:
#   scripts/package.sh [BUILD_DIR [CMAKE_ARGS...]]   (default build/package)
# Prints the .deb's path on the last line. Install it with
#   sudo apt install ./build/package/p11mux_*.deb
# CMAKE_ARGS are passed to CMake (e.g. -DP11MUX_PACKAGE_MAINTAINER=...). Not an
# environment variable: P11MUX_* names are p11mux's settings.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build/package}
shift $(($# > 0 ? 1 : 0))

# Clean, but only a build directory (or an empty or missing one).
if [[ -d $dir && -n $(ls -A "$dir") && ! -f $dir/CMakeCache.txt ]]; then
  echo "package.sh: $dir is not a build directory; not removing it" >&2
  exit 1
fi
rm -rf "$dir"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
# Debian's build flags (stack protector, _FORTIFY_SOURCE, relro), as its own
# packages get them; CMake takes CXXFLAGS and LDFLAGS from the environment.
# Without -g: the package is stripped, and -g costs ~30% more compile time.
if command -v dpkg-buildflags >/dev/null; then
  CXXFLAGS="$(dpkg-buildflags --get CPPFLAGS) $(DEB_CXXFLAGS_MAINT_STRIP=-g dpkg-buildflags --get CXXFLAGS)"
  LDFLAGS=$(dpkg-buildflags --get LDFLAGS)
  export CXXFLAGS LDFLAGS
fi
# /usr: the distribution's layout (lib/<multiarch>, /etc). No tests: `cpack`
# installs what `all` builds, which is then the module and p11mux-load only.
# Warnings are not errors here: GCC 12 at -O3 (Release) warns falsely
# (-Wrestrict in std::string's operator+), and CI builds with -Werror at -O2.
cmake -S . -B "$dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX=/usr \
  -DBUILD_TESTING=OFF "$@" >/dev/null
cmake --build "$dir" -j "$(nproc)" --target p11mux p11mux-load
(cd "$dir" && cpack -G DEB >cpack.log) || { cat "$dir/cpack.log"; exit 1; }
(cd "$dir" && ls "$PWD"/p11mux_*.deb)
