#!/usr/bin/env bash
# clang-tidy (.clang-tidy's checks) over the module's sources: proxy/ and
# backend-loader/, with the flags of a build's compile_commands.json (the plain
# build, build/release, configured if missing; or --build DIR). Prints the
# findings and a count per check; exits non-zero when there are any. About
# 130 s of CPU (a minute on 2 free cores); the `clang-tidy` test runs it.
# Usage: scripts/tidy.sh [--build DIR] [files...]
set -euo pipefail
cd "$(dirname "$0")/.."
build=build/release
if [ "${1:-}" = "--build" ]; then
  build=$2
  shift 2
fi
tidy=$(command -v clang-tidy-14 || command -v clang-tidy)
if [ ! -f "$build/compile_commands.json" ]; then
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
fi
# version.h is generated at configure time; nothing else needs a build first.
if [ $# -gt 0 ]; then
  files=("$@")
else
  mapfile -t files < <(git ls-files 'proxy/*.cpp' 'backend-loader/*.cpp')
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
# The flags are GCC's; clang needs a deeper nesting limit for the name
# tables' std::arrays (as the fuzz build, CMakeLists.txt).
printf '%s\n' "${files[@]}" |
  xargs -P "$(nproc)" -n 1 "$tidy" -p "$build" --quiet --extra-arg=-fbracket-depth=1024 \
    2>/dev/null >"$out" || true
# A header's finding is reported once per file that includes it, and a
# template's once per instantiation: once per place and check here.
grep -E '^[^ ].*: (warning|error): ' "$out" |
  sort -t: -k1,1 -k2,2n -k3,3n |
  awk '{ key = $1 " " $NF } !seen[key]++' >"$out.findings" || true
cat "$out.findings"
count=$(wc -l <"$out.findings")
sed -E 's/.*\[([^]]+)\]$/\1/' "$out.findings" | sort | uniq -c | sort -rn
rm -f "$out.findings"
echo "tidy: $count findings in ${#files[@]} files"
[ "$count" -eq 0 ]
