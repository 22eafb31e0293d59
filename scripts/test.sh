#!/usr/bin/env bash
# The whole test suite, from a clean clone: installs what is needed, builds
# p11mux three times (plain, ThreadSanitizer, AddressSanitizer+UBSan) with
# warnings as errors, and runs the tests in each. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

jobs=$(nproc)
build() {
  local dir=$1
  shift
  cmake -S . -B "$dir" -G Ninja -DP11MUX_WERROR=ON "$@" >/dev/null
  cmake --build "$dir" -j "$jobs"
}
run() {
  local dir=$1
  shift
  ctest --test-dir "$dir" --output-on-failure --timeout 600 -j "$jobs" "$@"
}

echo "== plain build: every test"
build build/release -DCMAKE_BUILD_TYPE=RelWithDebInfo
run build/release

# Programs we do not build (pkcs11-tool, p11tool) cannot load a sanitized
# library, so the sanitizer runs leave out the tests labelled `external`.
echo "== ThreadSanitizer build: concurrency tests"
build build/tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DP11MUX_SANITIZE=thread -DP11MUX_BUILD_EXAMPLES=OFF
TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$PWD/tests/tsan.supp" \
  run build/tsan -L 'concurrency|unit' -LE external

echo "== AddressSanitizer+UBSan build: every test"
build build/asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DP11MUX_SANITIZE=address -DP11MUX_BUILD_EXAMPLES=OFF
ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  LSAN_OPTIONS="suppressions=$PWD/tests/lsan.supp" \
  run build/asan -LE external
