#!/usr/bin/env bash
# The point of p11mux in under a minute: many threads sharing one PKCS#11
# session through p11mux are correct, while SoftHSM2 called directly crashes;
# and many threads, each with its own session, run through p11mux on a
# network HSM that allows 4 sessions, which refuses them directly.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/demo.sh [options]

Installs the Debian packages (scripts/setup.sh), builds p11mux in build/release,
makes a throwaway SoftHSM2 token, and runs p11mux-load with 64 threads on ONE
shared session (ECDSA P-256 signatures and SHA-256 digests, every result
verified): through p11mux (session_mode = multiplex, or serialize in a build
without it), then against SoftHSM2 directly, which crashes (run in a
subprocess; that crash is the expected outcome). Last, the same load with
one session per thread, SoftHSM2 directly vs through p11mux. Then a network
HSM that allows 4 sessions (libp11mux-slow.so, the test backend: SoftHSM2 with
0.5 ms per crypto call): --hsm-threads threads each opening its own session,
directly (refused with CKR_SESSION_COUNT) and through p11mux ([pool] bind =
state: a session holds one of the HSM's 4 only while it has an operation
under way).

Exit status 0 when the runs through p11mux had no errors and no failed checks.

Options:
  --threads N     threads (default 64)
  --duration S    seconds of the shared-session run (default 5)
  --hsm-threads N threads of the network-HSM run (default 32)
  --build DIR     build tree (default build/release)
  --no-setup      skip scripts/setup.sh (packages already installed)
  --no-build      use the build tree as it is
  -h, --help      this text
EOF
}

repo=$(cd "$(dirname "$0")/.." && pwd)
threads=64
duration=5
hsm_threads=32
build="$repo/build/release"
setup=1
do_build=1
while [ $# -gt 0 ]; do
  case $1 in
    --threads) threads=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --hsm-threads) hsm_threads=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --no-setup) setup=0; shift ;;
    --no-build) do_build=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "demo.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

bold=""; green=""; red=""; yellow=""; reset=""
if [ -t 1 ]; then
  bold=$'\e[1m'; green=$'\e[32m'; red=$'\e[31m'; yellow=$'\e[33m'; reset=$'\e[0m'
fi
step() { printf '\n%s%s%s\n' "$bold" "$*" "$reset"; }
indent() { sed 's/^/    /'; }
thousands() { sed ':a;s/\B[0-9]\{3\}\>/,&/;ta'; }

work=$(mktemp -d "${TMPDIR:-/tmp}/p11mux-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "${bold}p11mux demo${reset}: $threads threads sharing one PKCS#11 session, with and without p11mux"

step "1. Packages (scripts/setup.sh)"
if [ "$setup" = 1 ]; then
  "$repo/scripts/setup.sh"
fi
echo "    ok"

step "2. Build ($build)"
if [ "$do_build" = 1 ]; then
  {
    cmake -S "$repo" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo &&
      cmake --build "$build" --target p11mux p11mux-load p11mux-slow
  } >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; echo "demo.sh: the build failed" >&2; exit 1; }
fi
for f in "$build/proxy/libp11mux.so" "$build/examples/p11mux-load/p11mux-load" \
  "$build/tests/backends/faulty/libp11mux-slow.so"; do
  [ -e "$f" ] || { echo "demo.sh: $f is missing" >&2; exit 1; }
done
p11mux="$build/proxy/libp11mux.so"
load="$build/examples/p11mux-load/p11mux-load"
slow="$build/tests/backends/faulty/libp11mux-slow.so"
softhsm=/usr/lib/softhsm/libsofthsm2.so
echo "    ok: $p11mux"

step "3. A throwaway SoftHSM2 token"
mkdir "$work/tokens"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$work" \
  >"$work/softhsm2.conf"
export SOFTHSM2_CONF="$work/softhsm2.conf" P11MUX_LOAD_PIN=123456
softhsm2-util --init-token --free --label demo --so-pin 12345678 --pin 123456 >/dev/null
"$load" --module "$softhsm" --token-label demo --op sign-ec --count 1 --quiet >/dev/null 2>&1
echo "    ok: token 'demo' in $work, with an EC P-256 key pair"

# The workload: ECDSA signatures and SHA-256 digests, every result verified.
workload=(--token-label demo --op "sign-ec,digest" --threads "$threads" --verify-all --quiet)

# multiplex (each call on a shared session gets a backend session of its own)
# is the mode for this workload; builds without it use serialize.
export P11MUX_MODULE="$softhsm" P11MUX_SESSION_MODE=multiplex
if ! "$load" --module "$p11mux" --list-tokens >/dev/null 2>&1; then
  P11MUX_SESSION_MODE=serialize
fi

step "4. $threads threads on ONE shared session, through p11mux (libp11mux.so in front of SoftHSM2, session_mode = $P11MUX_SESSION_MODE)"
p11mux_ok=0
if "$load" --module "$p11mux" "${workload[@]}" --sessions shared --warmup 0.5 --duration "$duration" \
  >"$work/p11mux.txt" 2>&1; then
  p11mux_ok=1
fi
grep -v '^$' "$work/p11mux.txt" | indent
checks=$(sed -n 's/^checks *\([0-9]*\) results verified.*/\1/p' "$work/p11mux.txt" | thousands)
if [ "$p11mux_ok" = 1 ]; then
  echo "    ${green}=> OK: no errors, all ${checks:-?} signatures and digests verified${reset}"
  if grep -q '^collisions' "$work/p11mux.txt"; then
    echo "       (a collision is a clean CKR_OPERATION_ACTIVE: another thread's sign or digest was under way"
    echo "       on the shared session; p11mux serialized the calls, and the tool retried)"
  fi
else
  echo "    ${red}=> FAILED: p11mux did not handle the shared session cleanly (see above)${reset}"
fi

step "5. The same, SoftHSM2 called directly (in a subprocess, because it is expected to crash)"
ulimit -c 0
rc=0
start=$(date +%s.%N)
{
  timeout -k 5 $((${duration%.*} + 30)) "$load" --module "$softhsm" "${workload[@]}" --sessions shared \
    --duration "$duration" >"$work/direct.txt" 2>&1
} 2>/dev/null || rc=$?
took=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
if [ "$rc" -gt 128 ] && [ "$rc" -ne 137 ]; then
  echo "    ${yellow}=> CRASHED with SIG$(kill -l $((rc - 128))) after $took s: the expected outcome.${reset}"
  echo "       SoftHSM2, like most PKCS#11 modules, is not safe for concurrent calls on one session."
elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "    ${yellow}=> HUNG: stopped after $took s (a deadlock instead of the usual crash).${reset}"
else
  grep -E '^(measured|errors|checks|result)' "$work/direct.txt" | indent
  echo "    ${yellow}=> did not crash this time (exit status $rc); it usually does within a second.${reset}"
fi

step "6. One session per thread (what the spec allows): SoftHSM2 directly vs through p11mux, 3 s each"
rate() {  # MODULE: ops/s of the workload with a session per thread
  "$load" --module "$1" "${workload[@]}" --sessions per-thread --warmup 0.5 --duration 3 --json |
    grep -o '"ops_per_sec":[0-9.]*' | head -1 | cut -d: -f2
}
direct_rate=$(rate "$softhsm" || true)
p11mux_rate=$(rate "$p11mux" || true)
if [ -n "$direct_rate" ] && [ -n "$p11mux_rate" ]; then
  printf '    SoftHSM2 directly   %12s ops/s\n' "$(printf '%.0f' "$direct_rate" | thousands)"
  printf '    through p11mux      %12s ops/s  (%.2fx, %s; noisy on a busy machine: see scripts/bench.sh)\n' \
    "$(printf '%.0f' "$p11mux_rate" | thousands)" "$(awk -v a="$p11mux_rate" -v b="$direct_rate" 'BEGIN { print a / b }')" "$P11MUX_SESSION_MODE"
else
  echo "    ${red}a per-thread run failed${reset}"
  p11mux_ok=0
fi

step "7. A network HSM that allows 4 sessions (libp11mux-slow.so: SoftHSM2 with 0.5 ms per crypto call), $hsm_threads threads each with its own session, 3 s each"
# The slow backend refuses a fifth session (P11MUX_FAULTY_MAX_SESSIONS); its
# token info reports no limit, so p11mux learns it from that refusal.
hsm=(--token-label demo --op sign-ec --threads "$hsm_threads" --sessions per-thread --verify-all --quiet)
echo "    directly:"
rc=0
P11MUX_FAULTY_MAX_SESSIONS=4 timeout -k 5 60 "$load" --module "$slow" "${hsm[@]}" --duration 3 \
  >"$work/hsm-direct.txt" 2>&1 || rc=$?
if [ "$rc" = 2 ] && grep -q CKR_SESSION_COUNT "$work/hsm-direct.txt"; then
  grep -m1 'error' "$work/hsm-direct.txt" | indent | indent
  echo "    ${yellow}=> REFUSED with CKR_SESSION_COUNT: the HSM allows 4 sessions, the application needs $((hsm_threads + 1))${reset}"
  echo "       (one per thread, and p11mux-load's setup session, which holds the login)."
else
  grep -E '^(measured|errors|checks|result)' "$work/hsm-direct.txt" | indent | indent
  echo "    ${yellow}=> not refused this time (exit status $rc)${reset}"
fi
echo "    through p11mux (session_mode = $P11MUX_SESSION_MODE, [pool] bind = state):"
hsm_ok=0
if P11MUX_MODULE="$slow" P11MUX_POOL_BIND=state P11MUX_FAULTY_MAX_SESSIONS=4 timeout -k 5 60 \
  "$load" --module "$p11mux" "${hsm[@]}" --warmup 0.5 --duration 3 >"$work/hsm-p11mux.txt" 2>&1; then
  hsm_ok=1
fi
grep -E '^(measured|sign-ec|errors|  |checks|result)|^op ' "$work/hsm-p11mux.txt" | indent | indent
if [ "$hsm_ok" = 1 ]; then
  echo "    ${green}=> OK: $hsm_threads sessions open over the HSM's 4, no errors, every signature verified${reset}"
  echo "       (at most ~4,000 signatures/s are possible: 4 sessions x 1 ms of HSM time each)"
else
  echo "    ${red}=> FAILED through p11mux (see above)${reset}"
  p11mux_ok=0
fi

echo
if [ "$p11mux_ok" = 1 ]; then
  echo "${green}${bold}Done:${reset} through p11mux, $threads threads shared one session with no errors; directly, SoftHSM2 did not survive it."
  echo "      And $hsm_threads threads with a session each ran on an HSM that allows 4; directly, it refused them."
  echo "Next: scripts/test.sh (the test suite), scripts/bench.sh (the benchmarks), README.md (configuration)."
  exit 0
fi
echo "${red}${bold}The p11mux part failed${reset}: see the output above."
exit 1
