#!/usr/bin/env bash
# The C and C++ sources in the style of .clang-format. Without arguments,
# reformats every tracked source in place; with --check, changes nothing and
# exits non-zero naming each file that is not formatted (the `clang-format`
# test runs this). To format only the lines a change touches:
# `git clang-format-14`.
set -euo pipefail
cd "$(dirname "$0")/.."
format=$(command -v clang-format-14 || command -v clang-format)
mapfile -t files < <(git ls-files '*.c' '*.cpp' '*.h' '*.hpp')
if [ "${1:-}" = "--check" ]; then
  bad=0
  for f in "${files[@]}"; do
    if ! "$format" --dry-run -Werror "$f" >/dev/null 2>&1; then
      echo "not formatted: $f (scripts/format.sh formats it)"
      bad=1
    fi
  done
  exit $bad
fi
"$format" -i "${files[@]}"
