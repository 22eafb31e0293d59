#!/usr/bin/env bash
# The whole test suite, from a clean clone: installs what is needed, builds
# p11mux three times (plain, ThreadSanitizer, AddressSanitizer+UBSan) with
# warnings as errors, and runs the tests in each; builds the library with
# clang's thread-safety analysis; then fuzzes it for a minute (clang with
# libFuzzer). Exits non-zero on any failure.
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

# The sanitizer and fuzzer builds: -O1 and line tables only (-g1), which is
# all their reports' stack traces need. Under ASan+UBSan that halves the
# build, the suite's longest stage (entry_points.cpp: 136 s against 291 s
# at -O2 -g; docs/bench/ci-time.md).
sanitized=(-DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1 -DNDEBUG")

echo "== plain build: every test"
build build/release -DCMAKE_BUILD_TYPE=RelWithDebInfo
run build/release

# Clang's thread-safety analysis (proxy/sync/lock.hpp): the library only, as
# errors, then the tests that show the analysis rejects an unguarded access.
echo "== thread-safety build (clang -Wthread-safety): the library"
cmake -S . -B build/thread-safety -G Ninja -DP11MUX_WERROR=ON -DCMAKE_BUILD_TYPE=Debug \
  -DCMAKE_CXX_COMPILER=clang++ -DP11MUX_THREAD_SAFETY=ON -DP11MUX_BUILD_EXAMPLES=OFF >/dev/null
cmake --build build/thread-safety -j "$jobs" --target p11mux
run build/thread-safety -R '^thread-safety-'

# Programs we do not build (pkcs11-tool, p11tool) cannot load a sanitized
# library, so the sanitizer runs leave out the tests labelled `external`.
echo "== ThreadSanitizer build: concurrency tests"
build build/tsan "${sanitized[@]}" -DP11MUX_SANITIZE=thread -DP11MUX_BUILD_EXAMPLES=OFF
TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$PWD/tests/tsan.supp" \
  run build/tsan -L 'concurrency|unit' -LE external

echo "== AddressSanitizer+UBSan build: every test"
build build/asan "${sanitized[@]}" -DP11MUX_SANITIZE=address -DP11MUX_BUILD_EXAMPLES=OFF
ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  LSAN_OPTIONS="suppressions=$PWD/tests/lsan.supp" \
  run build/asan -LE external

# libFuzzer (clang): libp11mux.so and the null and race-detector backends
# built with ASan+UBSan and coverage, the committed corpus replayed, then 60 s
# of fuzzing from it with a fixed seed (tests/fuzz/README.md). A crash, leak
# or sanitizer report fails the run and leaves the input in build/fuzz/.
echo "== libFuzzer build (clang): fuzzing p11mux over the null, race-detector and spec-bender backends for 60 s"
cmake -S . -B build/fuzz -G Ninja -DP11MUX_WERROR=ON "${sanitized[@]}" \
  -DCMAKE_CXX_COMPILER=clang++ -DP11MUX_FUZZ=ON -DP11MUX_BUILD_EXAMPLES=OFF >/dev/null
cmake --build build/fuzz -j "$jobs" --target p11mux-fuzz
rm -rf build/fuzz/corpus && mkdir -p build/fuzz/corpus
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  build/fuzz/tests/fuzz/p11mux-fuzz -seed=1 -max_total_time=60 -timeout=10 -max_len=1024 \
  -len_control=0 -print_final_stats=1 -artifact_prefix=build/fuzz/ build/fuzz/corpus tests/fuzz/corpus
