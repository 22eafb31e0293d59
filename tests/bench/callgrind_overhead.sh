#!/usr/bin/env bash
# Instructions per call added by p11mux (and p11-kit's proxy, for comparison)
# over SoftHSM2, counted with callgrind: two run lengths, so start-up cancels.
# Deterministic, unlike wall time on a shared machine.
#   tests/bench/callgrind_overhead.sh BUILD_DIR [OPS...]
set -euo pipefail
build=${1:?usage: callgrind_overhead.sh BUILD_DIR [random session-info open-close]}
shift
ops=("$@")
[ ${#ops[@]} -gt 0 ] || ops=(random session-info open-close)
loop="$build/tests/bench/call-loop"
p11mux="$build/proxy/libp11mux.so"
softhsm=/usr/lib/softhsm/libsofthsm2.so
p11kit=/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so
short=2000
long=12000

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/tokens"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$work" \
  > "$work/softhsm2.conf"
export SOFTHSM2_CONF="$work/softhsm2.conf"
softhsm2-util --init-token --free --label bench --so-pin 12345678 --pin 123456 >/dev/null
# p11-kit's proxy loads the modules p11-kit is configured with: just SoftHSM2 here.
mkdir -p "$work/p11kit/modules"
printf 'module: %s\n' "$softhsm" > "$work/p11kit/modules/softhsm2.module"
export P11MUX_MODULE="$softhsm" P11MUX_LOG_LEVEL=off

instructions() {  # MODULE OP COUNT -> total instructions
  local out="$work/cg.out"
  env XDG_CONFIG_HOME="$work/p11kit-user" P11_KIT_NO_USER_CONFIG=1 \
    P11_KIT_CONFIG_MODULE_PATH="$work/p11kit/modules" \
    valgrind --tool=callgrind --callgrind-out-file="$out" "$loop" "$1" "$2" "$3" \
    >/dev/null 2>"$work/vg.err" || { cat "$work/vg.err" >&2; return 1; }
  grep -E '^(summary|totals):' "$out" | head -1 | awk '{print $2}'
}

printf '%-14s %-14s %14s %14s\n' "call" "module" "instr/call" "added"
for op in "${ops[@]}"; do
  base=""
  for m in softhsm p11mux p11kit; do
    path=${!m}
    [ -e "$path" ] || continue
    a=$(instructions "$path" "$op" $short) || continue
    b=$(instructions "$path" "$op" $long) || continue
    per=$(( (b - a) / (long - short) ))
    [ -n "$base" ] || base=$per
    printf '%-14s %-14s %14d %+14d\n' "$op" "$m" "$per" $(( per - base ))
  done
done
