#!/usr/bin/env bash
# Instructions per call added by p11mux (and by p11-kit's proxy, for
# comparison), counted with callgrind: each case runs call-loop at two lengths,
# so start-up and shutdown cancel out. Deterministic, unlike wall time on a
# shared machine. Run by scripts/bench.sh; also useful alone.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: tests/bench/callgrind_overhead.sh [options]

Counts instructions per PKCS#11 call (valgrind --tool=callgrind) for each
backend called directly and through p11mux (and p11-kit-proxy over SoftHSM2),
and prints the difference to the direct call, and how many of them ran inside
libp11mux.so ("in p11mux"): p11mux's own. The total also moves with the
backend's work on the addresses p11mux leaves it (SoftHSM2's secure memory
registry is a std::map keyed by pointers: up to 60 instructions a signature
from one build to another); the count inside p11mux does not.

Options:
  --build DIR       build tree with call-loop, libp11mux.so, the mock and the
                    p11-kit shim (default: build/release)
  --backends LIST   softhsm, mock (default: "softhsm mock")
  --configs LIST    direct, serialize, multiplex, p11kit, group (default: all;
                    p11kit only over SoftHSM2; group: a group of one member,
                    SoftHSM2's token or the mock's first, in serialize mode,
                    against serialize: the cost of a group with nothing to
                    balance)
  --ops LIST        random (C_GenerateRandom, 16 bytes), session-info,
                    open-close (default: all three); also sign (C_SignInit +
                    C_Sign, HMAC-SHA256 with a session key made before the loop)
                    and find (C_FindObjectsInit by label + C_FindObjects +
                    C_FindObjectsFinal, finding that key)
  --short N         calls in the short run (default 2000)
  --long N          calls in the long run (default 12000)
  --csv FILE        also write the rows as CSV
  --idle-thread     every case runs with a second thread that only sleeps
                    (call-loop --idle-thread): glibc's malloc then takes its
                    multi-threaded path in every configuration, as it does
                    anyway in a group's (its members' thread); compare a
                    group with the plain configuration this way
  -h, --help        this text
A configuration whose module refuses to initialize (e.g. session_mode =
multiplex before it exists) is reported as unavailable. P11MUX_* variables
set when the script is run reach p11mux, e.g. a policy:
  P11MUX_POLICY_MECHANISMS_ALLOW="CKM_SHA256_HMAC CKM_GENERIC_SECRET_KEY_GEN" \
    tests/bench/callgrind_overhead.sh --backends softhsm --ops sign
EOF
}

repo=$(cd "$(dirname "$0")/../.." && pwd)
build="$repo/build/release"
backends="softhsm mock"
configs="direct serialize multiplex p11kit group"
ops="random session-info open-close"
short=2000
long=12000
csv=""
idle=""
while [ $# -gt 0 ]; do
  case $1 in
    --build) build=$2; shift 2 ;;
    --backends) backends=$2; shift 2 ;;
    --configs) configs=$2; shift 2 ;;
    --ops) ops=$2; shift 2 ;;
    --short) short=$2; shift 2 ;;
    --long) long=$2; shift 2 ;;
    --csv) csv=$2; shift 2 ;;
    --idle-thread) idle=--idle-thread; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "callgrind_overhead.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
build=$(cd "$build" && pwd)
loop="$build/tests/bench/call-loop"
p11mux="$build/proxy/libp11mux.so"
mock="$build/tests/backends/libp11mux-mock.so"
shim="$build/tests/bench/libp11kit-isolate.so"
softhsm=/usr/lib/softhsm/libsofthsm2.so
p11kit=/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so
for f in "$loop" "$p11mux" "$mock" "$shim"; do
  [ -e "$f" ] || { echo "callgrind_overhead.sh: $f not found: build first (see --help)" >&2; exit 2; }
done
command -v valgrind >/dev/null || { echo "callgrind_overhead.sh: valgrind not installed (scripts/setup.sh)" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/tokens" "$work/p11kit"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$work" \
  >"$work/softhsm2.conf"
export SOFTHSM2_CONF="$work/softhsm2.conf"
softhsm2-util --init-token --free --label bench --so-pin 12345678 --pin 123456 >/dev/null
# p11-kit-proxy with SoftHSM2 as its only module (see p11kit_isolate.cpp).
printf 'module: %s\n' "$softhsm" >"$work/p11kit/softhsm2.module"
# A group of one member (README.md, "Several HSMs"): the token above, or
# the mock's first.
printf '[backend.hsm]\nmodule = %s\n[group.one]\nmembers = hsm/label:bench\n' "$softhsm" \
  >"$work/group-softhsm.conf"
printf '[backend.hsm]\nmodule = %s\n[group.one]\nmembers = hsm/label:mock-token-0\n' "$mock" \
  >"$work/group-mock.conf"
export P11MUX_LOG_LEVEL=off

# run BACKEND CONFIG OP COUNT: "TOTAL IN_P11MUX" instructions, or fails with
# the reason on stderr. IN_P11MUX: the cost lines of libp11mux.so's own
# functions (ob=), without the lines after calls= (a callee's inclusive cost).
run() {
  local backend_path=${!1} config=$2 op=$3 count=$4 module
  local -a env=()
  case $config in
    direct) module=$backend_path ;;
    serialize | multiplex)
      module=$p11mux
      env=(P11MUX_MODULE="$backend_path" P11MUX_SESSION_MODE="$config") ;;
    p11kit)
      module=$p11kit
      env=(P11KIT_ISOLATE_MODULES="$work/p11kit" LD_PRELOAD="$shim") ;;
    group)
      module=$p11mux
      env=(P11MUX_CONFIG="$work/group-$1.conf" P11MUX_MODULE= P11MUX_SESSION_MODE=serialize) ;;
  esac
  local out="$work/callgrind.out"
  rm -f "$out"
  if ! env "${env[@]}" valgrind --tool=callgrind --callgrind-out-file="$out" \
    --compress-strings=no --compress-pos=no \
    "$loop" "$module" "$op" "$count" $idle >/dev/null 2>"$work/valgrind.err"; then
    grep -v '^==' "$work/valgrind.err" | head -1 >&2
    return 1
  fi
  local total
  total=$(grep -E '^(summary|totals):' "$out" | head -1 | awk '{print $2}')
  awk -v total="$total" '
    /^ob=/ { ob = substr($0, 4); next }
    /^calls=/ { skip = 1; next }
    /^[0-9]/ { if (skip) { skip = 0; next } if (ob ~ /libp11mux\.so/) own += $2 }
    END { print total, own + 0 }' "$out"
}

[ -z "$csv" ] || echo "backend,config,call,instructions_per_call,added_to_direct,status,in_p11mux" >"$csv"
printf '%-8s %-10s %-13s %12s %10s %10s\n' backend config call instr/call added "in p11mux"
for backend in $backends; do
  for op in $ops; do
    base=""
    for config in $configs; do
      case $config in p11kit) [ "$backend" = softhsm ] || continue ;; esac
      if a=$(run "$backend" "$config" "$op" "$short" 2>"$work/why") &&
        b=$(run "$backend" "$config" "$op" "$long" 2>"$work/why"); then
        read -r a a_own <<<"$a"
        read -r b b_own <<<"$b"
        per=$(((b - a) / (long - short)))
        own=$(((b_own - a_own) / (long - short)))
        [ "$config" != direct ] || base=$per
        added=""
        [ -z "$base" ] || added=$((per - base))
        printf '%-8s %-10s %-13s %12d %10s %10d\n' "$backend" "$config" "$op" "$per" "${added:+$(printf '%+d' "$added")}" "$own"
        [ -z "$csv" ] || echo "$backend,$config,$op,$per,$added,ok,$own" >>"$csv"
      else
        why=$(head -c 160 "$work/why" | tr ',\n' '; ' | sed 's/ *$//')
        printf '%-8s %-10s %-13s %12s %10s %10s  %s\n' "$backend" "$config" "$op" unavailable "" "" "$why"
        [ -z "$csv" ] || echo "$backend,$config,$op,,,unavailable: $why," >>"$csv"
      fi
    done
  done
done
