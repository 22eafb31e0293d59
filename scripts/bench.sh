#!/usr/bin/env bash
# The benchmark suite: p11mux-load over SoftHSM2 (on a fresh token) and over
# the mock backend, called directly, through p11mux in each session mode and
# through p11-kit-proxy. Prints and writes the figures; never asserts them.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/bench.sh [options]

Runs p11mux-load against SoftHSM2 on a fresh throwaway token and against the
mock and null backends, directly and through p11mux (session_mode serialize and
multiplex) and p11-kit-proxy (loading SoftHSM2 only), and writes to the
results directory:
  results.csv       one row per case: median ops/s of the runs, ratio, status
  results.md        the tables, the targets of issue 5 with pass/miss
  throughput.png    throughput vs threads per operation
  overhead.csv      CPU ns per call of p11mux-load over the null backend
  null-overhead.csv CPU ns per call, by function, over the null backend
  callgrind.csv     instructions per call
  runs.csv          every single run
A full run takes about 23 minutes on 2 cores (9 of them tls); --quick about 5.

Sections (--only):
  matrix     ops x threads x {direct, serialize, multiplex, p11kit}, one
             session per thread
  overhead   CPU ns per call over the null backend (libp11mux-null.so), direct
             vs p11mux: p11mux-load at 1 and 2 threads (op random at two run
             lengths, so start-up cancels), and tests/bench/null-overhead
             (five calls, one thread, median of the rounds)
  open       open+close against a mock whose C_OpenSession takes 1 ms
  shared     all threads on ONE session (sign-ec, digest; 8 and 64 threads):
             SoftHSM2 directly crashes, which is recorded as a crash
  callgrind  instructions per call (tests/bench/callgrind_overhead.sh)
  capacity   many application sessions over few HSM sessions (issue 13):
             the slow backend (libp11mux-slow.so over SoftHSM2: 0.5 ms per
             crypto call, at most 4 sessions), op sign-ec (C_SignInit +
             C_Sign, 1 ms of backend time). The physical capacity: 4 threads
             each with its own session, directly (the limit raised to 5 for
             p11mux-load's idle setup session, which holds the login). Then
             through p11mux with [pool] bind = state: 32 and 256 threads each
             with its own session and 64 threads on one shared session, in
             both modes; and 32 threads with their own sessions directly,
             which the HSM refuses (CKR_SESSION_COUNT), as does p11mux with
             bind = open (wait_ms = 0: at once). Ratio to the physical
             capacity of the same run, errors, p99 latency (which includes
             any wait for a backend session); a run with errors gives no
             figure. Writes capacity.csv and a table
             in results.md. About 2 minutes
  groups     several HSMs as one slot (issue 15): three SoftHSM2 tokens
             holding the same imported EC key, each a member on the slow
             backend (at most 4 sessions per token), 64 threads signing
             (sign-ec) with their own sessions through groups of 1, 2 and 3
             members ([pool] bind = state), beside one member directly
             ("physical", 4 threads) and through p11mux's single backend;
             groups of 1 and 3 in multiplex mode, the 64 threads sharing one
             session. Scaling is groupN / (N x group1), and the same in
             multiplex mode. Writes groups.csv and a table
             in results.md. About 1 minute
  failover   a member dying under load (issue 15): the group of 3 members above
             (serialize mode, recovery_interval_s = 1), 64 threads signing
             (sign-ec) for 12 s; member-2's token is removed about 4 s into
             the run and back about 4 s later (P11MUX_FAULTY_SCHEDULE).
             Reports the failed ops the application saw (by CKR), the
             throughput before the kill (median of 100 ms intervals), the
             time from the kill until throughput (0.5 s sliding mean) is
             back to 2/3 of it or more and stays there until the member
             returns, and the time from the member's return
             until it carries load again (p11mux's /metrics, polled every
             0.2 s). Writes failover.csv, failover-timeline.csv (ops/s and
             errors per 100 ms), failover-member-calls.csv (the samples),
             failover-runN.log (p11mux-load's stderr: the fault times) and
             a table in results.md. About 20 s per run
  tls        full TLS handshakes per second (TLSv1.3, no resumption) through
             stunnel (threads) and nginx (2 workers) with the server key on
             the token, loaded by the OpenSSL pkcs11 engine: directly and
             through p11mux in both modes, over SoftHSM2 and over the slow
             backend (libp11mux-slow.so: network-HSM latency, at most 4
             sessions per process); parallel openssl s_time clients. Writes
             tls.csv, tls-runs.csv and a table in results.md. About 9
             minutes with the defaults, 2 per key type with --quick

Options:
  --quick           1 run of 0.7 s per case, callgrind on C_GenerateRandom only
  --runs N          runs per case, the median is reported (default 3)
  --duration S      measured seconds per run (default 1.5)
  --warmup S        unmeasured seconds before each run (default 0.5)
  --only LIST       sections to run, comma-separated (default: all)
  --ops LIST        matrix ops (default random,digest,sign-ec,sign-rsa,open-close)
  --threads LIST    matrix thread counts (default 1,2,8,64)
  --configs LIST    direct,serialize,multiplex,p11kit (default: all)
  --tls-duration S  measured seconds per TLS run (default 10)
  --tls-clients N   parallel openssl s_time clients (default 8)
  --tls-keys LIST   ec (P-256), rsa (2048) (default ec)
  --tls-servers LIST    stunnel,nginx (default both)
  --tls-backends LIST   softhsm,slow (default both)
  --tls-slow-latency L  the slow backend's latency, as P11MUX_FAULTY_LATENCY
                    (default its own: open=2000,close=1000,login=2000,crypto=500)
  --out DIR         results directory (default bench-results)
  --build DIR       build tree (default build/release); it is configured
                    and built first unless --no-build
  --no-build        use the build tree as it is
  --publish         also copy results.md, results.csv and throughput.png to
                    docs/bench/
  -h, --help        this text

A configuration that cannot start (p11mux refusing session_mode = multiplex
before it exists) is reported as unavailable and the rest carries on. CPU
time on a shared machine is noisy: the runs of each case are interleaved
across configurations and the load average is recorded.
EOF
}

repo=$(cd "$(dirname "$0")/.." && pwd)
# The TLS servers' configuration files, shared with the client tests.
source "$repo/tests/clients/tls_config.sh"
runs=3
duration=1.5
warmup=0.5
quick=0
sections="matrix,overhead,open,shared,callgrind,capacity,groups,failover,tls"
ops="random,digest,sign-ec,sign-rsa,open-close"
threads_list="1,2,8,64"
configs="direct,serialize,multiplex,p11kit"
out="$repo/bench-results"
build="$repo/build/release"
do_build=1
publish=0
tls_duration=10
tls_clients=8
tls_keys=ec
tls_servers=stunnel,nginx
tls_backends=softhsm,slow
tls_slow_latency=""
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1; runs=1; duration=0.7; warmup=0.2; tls_duration=3; shift ;;
    --runs) runs=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --only) sections=$2; shift 2 ;;
    --ops) ops=$2; shift 2 ;;
    --threads) threads_list=$2; shift 2 ;;
    --configs) configs=$2; shift 2 ;;
    --tls-duration) tls_duration=$2; shift 2 ;;
    --tls-clients) tls_clients=$2; shift 2 ;;
    --tls-keys) tls_keys=$2; shift 2 ;;
    --tls-servers) tls_servers=$2; shift 2 ;;
    --tls-backends) tls_backends=$2; shift 2 ;;
    --tls-slow-latency) tls_slow_latency=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --no-build) do_build=0; shift ;;
    --publish) publish=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "bench.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "bench.sh: --runs wants a positive number" >&2; exit 2; }
[[ $tls_duration =~ ^[1-9][0-9]*$ ]] || { echo "bench.sh: --tls-duration wants whole seconds" >&2; exit 2; }
[[ $tls_clients =~ ^[1-9][0-9]*$ ]] || { echo "bench.sh: --tls-clients wants a positive number" >&2; exit 2; }
IFS=, read -r -a ops <<<"$ops"
IFS=, read -r -a threads_list <<<"$threads_list"
IFS=, read -r -a configs <<<"$configs"
IFS=, read -r -a tls_keys <<<"$tls_keys"
IFS=, read -r -a tls_servers <<<"$tls_servers"
IFS=, read -r -a tls_backends <<<"$tls_backends"
want() { [[ ",$sections," == *",$1,"* ]]; }
for s in ${sections//,/ }; do
  [[ " matrix overhead open shared callgrind capacity groups failover tls " == *" $s "* ]] ||
    { echo "bench.sh: unknown section '$s' (see --help)" >&2; exit 2; }
done

# ---- build and paths ----
if [ "$do_build" = 1 ]; then
  [ -f "$build/CMakeCache.txt" ] ||
    cmake -S "$repo" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  cmake --build "$build" --target p11mux p11mux-load p11mux-mock p11mux-null call-loop \
    null-overhead p11kit-isolate p11mux-slow >/dev/null
fi
build=$(cd "$build" && pwd)
src=$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$build/CMakeCache.txt" 2>/dev/null || true)
src=${src:-$repo}  # the source tree that was built, for the commit in the report
load="$build/examples/p11mux-load/p11mux-load"
p11mux="$build/proxy/libp11mux.so"
mock="$build/tests/backends/libp11mux-mock.so"
null="$build/tests/backends/libp11mux-null.so"
null_overhead="$build/tests/bench/null-overhead"
shim="$build/tests/bench/libp11kit-isolate.so"
slow="$build/tests/backends/faulty/libp11mux-slow.so"
engine=/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so
softhsm=/usr/lib/softhsm/libsofthsm2.so
p11kit=/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so
for f in "$load" "$p11mux" "$mock" "$null" "$null_overhead" "$shim" "$softhsm" "$p11kit"; do
  [ -e "$f" ] || { echo "bench.sh: $f is missing (scripts/setup.sh, then build; see --help)" >&2; exit 2; }
done
command -v gnuplot >/dev/null || echo "bench.sh: gnuplot not installed (scripts/setup.sh): no chart" >&2

mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
tls_pid=""  # the TLS server running, stopped on exit
trap '[ -z "$tls_pid" ] || kill "$tls_pid" 2>/dev/null; rm -rf "$work"' EXIT
ulimit -c 0  # the crashes recorded below need no core files

# A fresh SoftHSM2 token with the keys p11mux-load uses, and p11-kit
# configurations that each load one module (see tests/bench/p11kit_isolate.cpp).
mkdir -p "$work/tokens" "$work/p11kit-softhsm"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$work" \
  >"$work/softhsm2.conf"
export SOFTHSM2_CONF="$work/softhsm2.conf" P11MUX_LOAD_PIN=123456
softhsm2-util --init-token --free --label bench --so-pin 12345678 --pin 123456 >/dev/null
printf 'module: %s\n' "$softhsm" >"$work/p11kit-softhsm/softhsm2.module"
"$load" --module "$softhsm" --token-label bench --op sign-ec,sign-rsa --count 2 --quiet >/dev/null 2>&1 ||
  { echo "bench.sh: cannot create the keys on the SoftHSM2 token" >&2; exit 1; }

# ---- one configuration: module path and environment ----
# per-thread-direct: the backend directly with a session per thread whatever
# the case's session mode, as the reference of the shared-session cases.
declare -A sessions_of=([per-thread-direct]=per-thread)
# Sets $module, the array $menv and the array $token for CONFIG over BACKEND.
select_config() {
  local backend=$1 config=$2 backend_path
  if [ "$backend" = mock ]; then
    backend_path=$mock
    token=(--token-label mock-token-0 --no-login)
  elif [ "$backend" = null ]; then
    backend_path=$null
    token=(--token-label null-token --no-login)
  elif [ "$backend" = slow ]; then
    backend_path=$slow
    token=(--token-label bench)
  else
    backend_path=$softhsm
    token=(--token-label bench)
  fi
  menv=()
  case $config in
    direct | per-thread-direct) module=$backend_path ;;
    serialize | multiplex)
      module=$p11mux
      menv=(P11MUX_MODULE="$backend_path" P11MUX_SESSION_MODE="$config") ;;
    p11kit)
      module=$p11kit
      menv=(LD_PRELOAD="$shim" P11KIT_ISOLATE_MODULES="$work/p11kit-$backend") ;;
    # The groups section: one member's token, directly or through p11mux's
    # single backend; and groups of its first N members (groups_setup).
    member-direct) module=$backend_path token=(--token-label member-1) ;;
    member-serialize)
      module=$p11mux token=(--token-label member-1)
      menv=(P11MUX_MODULE="$backend_path" P11MUX_SESSION_MODE=serialize) ;;
    group[1-3])
      module=$p11mux token=(--token-label signing)
      menv=(P11MUX_CONFIG="$work/$config.conf" P11MUX_SESSION_MODE=serialize) ;;
    # The same groups in multiplex mode: the threads share one session, each
    # on a lane of its own (docs/groups.md, "Multiplex mode").
    group[1-3]-multiplex)
      module=$p11mux token=(--token-label signing)
      menv=(P11MUX_CONFIG="$work/${config%-multiplex}.conf" P11MUX_SESSION_MODE=multiplex) ;;
  esac
}

# Whether BACKEND/CONFIG starts; the reason it does not in $unavailable[...].
declare -A unavailable=()
probe() {
  local backend=$1 config=$2 key="$1/$2"
  [ -z "${unavailable[$key]+x}" ] || return 1
  [ -z "${probed[$key]+x}" ] || return 0
  probed[$key]=1
  select_config "$backend" "$config"
  if ! env "${menv[@]}" P11_KIT_DEBUG=lib "$load" --module "$module" --list-tokens \
    >/dev/null 2>"$work/probe.err"; then
    unavailable[$key]=$(grep -v '^(p11-kit' "$work/probe.err" | head -1 | tr ',' ';')
    echo "  $config over $backend is unavailable: ${unavailable[$key]}"
    return 1
  fi
  if [ "$config" = p11kit ]; then
    local loaded
    loaded=$(grep -c 'opened module:' "$work/probe.err" || true)
    if [ "$loaded" != 1 ]; then
      unavailable[$key]="p11-kit-proxy loaded $loaded modules instead of only $backend"
      echo "  p11kit over $backend: ${unavailable[$key]}"
      return 1
    fi
  fi
  return 0
}
declare -A probed=()

# ---- running p11mux-load ----
raw="$out/runs.csv"
echo "section,backend,config,op,sessions,threads,run,ops_per_sec,errors,failed_checks,status" >"$raw"
run_timeout=$(awk -v d="$duration" -v w="$warmup" 'BEGIN { printf "%d", d + w + 60 }')

# More p11mux-load options for run_one (the failover section's --timeline).
load_extra=()

# run_one SECTION BACKEND CONFIG OP SESSIONS THREADS RUN [VAR=VALUE...]
# One p11mux-load process; sets $ops_s, $errors, $failed (verification
# failures) and $status (ok, errors, crash SIGxxx, hang, failed: ...) and
# appends them to runs.csv. A crash is the expected outcome of some cases, so
# it is recorded, never fatal.
run_one() {
  local section=$1 backend=$2 config=$3 op=$4 sessions=$5 threads=$6 run=$7
  shift 7
  select_config "$backend" "$config"
  local json="$work/run.json" err="$work/run.err" rc=0
  errors=""
  failed=""
  {
    env "${menv[@]}" "$@" timeout -k 5 "$run_timeout" "$load" --module "$module" "${token[@]}" \
      --op "$op" --threads "$threads" --sessions "${sessions_of[$config]:-$sessions}" --warmup "$warmup" \
      --duration "$duration" --quiet --json "${load_extra[@]}" >"$json" 2>"$err"
  } 2>/dev/null || rc=$?
  ops_s=""
  if [ "$rc" -le 1 ] && grep -q '"ops_per_sec"' "$json"; then
    ops_s=$(json_number ops_per_sec <"$json")
    errors=$(json_number errors <"$json")
    failed=$(json_number verification_failures <"$json")
  fi
  case $rc in
    0) status=ok ;;
    1) status=errors ;;
    124 | 137) status=hang ;;
    2) status="failed: $(head -1 "$err" | tr ',' ';')" ;;
    *) if [ "$rc" -gt 128 ]; then status="crash SIG$(kill -l $((rc - 128)))"; else status="failed: exit $rc"; fi ;;
  esac
  echo "$section,$backend,$config,$op,$sessions,$threads,$run,$ops_s,$errors,$failed,$status" >>"$raw"
}

# The first "KEY":number in a one-line JSON object: the top-level one, since
# p11mux-load prints the totals before the per-op objects.
json_number() { grep -o "\"$1\":[-0-9.e+]*" | head -1 | cut -d: -f2; }

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR) print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# Medians by "section/backend/config/op/sessions/threads", for the ratios.
declare -A med=()
results="$out/results.csv"
echo "section,backend,config,op,sessions,threads,runs,median_ops_per_sec,min_ops_per_sec,max_ops_per_sec,ratio,ratio_to,errors,failed_checks,status" >"$results"

# run_case SECTION BACKEND OP SESSIONS THREADS BASE CONFIGS... [-- VAR=VALUE...]
# Runs every configuration $runs times, interleaved (run 1 of each, then run
# 2...) so drifting machine load hits all alike, and records the medians.
# BASE is what the ratio compares with: a configuration of this case (the
# ratio is then the median of the per-run ratios, each run against the one
# just before or after it) or the key of another case in $med (median over
# median), or "" for none.
run_case() {
  local section=$1 backend=$2 op=$3 sessions=$4 threads=$5 base=$6
  shift 6
  local -a cfgs=() extra=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do cfgs+=("$1"); shift; done
  [ $# -eq 0 ] || { shift; extra=("$@"); }
  local c r
  local -A val=() errs=() fails=() states=()  # val[config/run] = ops/s
  for ((r = 1; r <= runs; r++)); do
    for c in "${cfgs[@]}"; do
      probe "$backend" "$c" || continue
      run_one "$section" "$backend" "$c" "$op" "$sessions" "$threads" "$r" "${extra[@]}"
      [ -z "$ops_s" ] || val[$c/$r]=$ops_s
      errs[$c]=$((${errs[$c]:-0} + ${errors:-0}))
      fails[$c]=$((${fails[$c]:-0} + ${failed:-0}))
      [[ " ${states[$c]:-} " == *" $status "* ]] || states[$c]+="${states[$c]:+ / }$status"
    done
  done
  local line base_key=$base
  [[ $base == */* ]] || base_key="$section/$backend/$base/$op/$sessions/$threads"
  line="  $(printf '%-10s %-10s %3s thr' "$op" "$sessions" "$threads")"
  for c in "${cfgs[@]}"; do
    local key="$section/$backend/$c/$op/$sessions/$threads" m="" lo="" hi="" ratio="" n=0 st
    if ! probe "$backend" "$c"; then
      st="unavailable: ${unavailable[$backend/$c]}"
      line+="  $c n/a"
    else
      local -a v=() q=()
      for ((r = 1; r <= runs; r++)); do
        [ -z "${val[$c/$r]:-}" ] || v+=("${val[$c/$r]}")
        if [[ $base != */* ]] && [ -n "${val[$c/$r]:-}" ] && [ -n "${val[$base/$r]:-}" ]; then
          q+=("$(awk -v a="${val[$c/$r]}" -v b="${val[$base/$r]}" 'BEGIN { print a / b }')")
        fi
      done
      n=${#v[@]}
      st=${states[$c]}
      if [ "$n" -gt 0 ]; then
        m=$(median "${v[@]}")
        lo=$(printf '%s\n' "${v[@]}" | sort -g | head -1)
        hi=$(printf '%s\n' "${v[@]}" | sort -g | tail -1)
        med[$key]=$m
      fi
      if [ "$key" != "$base_key" ]; then
        if [ ${#q[@]} -gt 0 ]; then
          ratio=$(printf '%.3f' "$(median "${q[@]}")")
        elif [[ $base == */* ]] && [ -n "$m" ] && [ -n "${med[$base]:-}" ]; then
          ratio=$(awk -v a="$m" -v b="${med[$base]}" 'BEGIN { printf "%.3f", a / b }')
        fi
      fi
      if [ "$st" = ok ]; then
        line+="  $c $(printf '%.0f' "$m")/s${ratio:+ (${ratio}x)}"
      else
        line+="  $c ${m:+$(printf '%.0f/s ' "$m")}[$st]"
      fi
    fi
    echo "$section,$backend,$c,$op,$sessions,$threads,$n,$m,$lo,$hi,$ratio,${base_key//\//:},${errs[$c]:-},${fails[$c]:-},$st" >>"$results"
  done
  echo "$line"
}

# ---- the sections ----
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
started=$(date +%s)
echo "bench: results in $out; $runs run(s) of ${duration} s per case; load average $load_start on $(nproc) CPUs"
if awk -v l="${load_start%% *}" -v n="$(nproc)" 'BEGIN { exit !(l > n) }'; then
  echo "bench: note: the load average is above the CPU count: wall-clock figures will be noisy"
fi

if want matrix; then
  echo "== throughput, one session per thread (SoftHSM2)"
  for op in "${ops[@]}"; do
    for t in "${threads_list[@]}"; do
      run_case matrix softhsm "$op" per-thread "$t" direct "${configs[@]}"
    done
  done
fi

# cpu_seconds CONFIG THREADS COUNT: user+system CPU time of one p11mux-load
# run of COUNT random ops over the null backend.
cpu_seconds() {
  select_config null "$1"
  local TIMEFORMAT='%3U %3S'
  {
    time env "${menv[@]}" "$load" --module "$module" "${token[@]}" --op random --threads "$2" \
      --count "$3" --quiet >/dev/null 2>"$work/cpu.err"
  } 2>"$work/cpu.time" || { head -1 "$work/cpu.err" >&2; return 1; }
  awk '{ print $1 + $2 }' "$work/cpu.time"
}

# p11mux's own cost per call: CPU time (not wall time: on a shared machine a
# process's share of the CPU varies far more than 50 ns per call) of COUNT2 -
# COUNT1 calls, so start-up cancels, like callgrind_overhead.sh's two lengths.
# Writes overhead.csv; the added ns are the median of the per-run differences.
overhead_case() {
  local t=$1 n1=$2 n2=$3 c r a b
  local -A ns=()
  for ((r = 1; r <= runs; r++)); do
    for c in direct serialize multiplex; do
      probe null "$c" || continue
      if a=$(cpu_seconds "$c" "$t" "$n1") && b=$(cpu_seconds "$c" "$t" "$n2"); then
        ns[$c/$r]=$(awk -v a="$a" -v b="$b" -v n=$((n2 - n1)) 'BEGIN { printf "%.1f", (b - a) * 1e9 / n }')
      fi
    done
  done
  local line
  line="  random     per-thread $(printf '%3s' "$t") thr  CPU ns per call:"
  for c in direct serialize multiplex; do
    local -a v=() d=()
    local m="" add="" st=ok
    if probe null "$c"; then
      for ((r = 1; r <= runs; r++)); do
        [ -n "${ns[$c/$r]:-}" ] || continue
        v+=("${ns[$c/$r]}")
        [ -z "${ns[direct/$r]:-}" ] || d+=("$(awk -v a="${ns[$c/$r]}" -v b="${ns[direct/$r]}" 'BEGIN { print a - b }')")
      done
      [ ${#v[@]} -gt 0 ] && m=$(median "${v[@]}") || st=failed
      [ "$c" = direct ] || [ ${#d[@]} -eq 0 ] || add=$(printf '%.1f' "$(median "${d[@]}")")
      line+="  $c ${m:-?}${add:+ ($(printf '%+.1f' "$add"))}"
    else
      st="unavailable: ${unavailable[null/$c]}"
      line+="  $c n/a"
    fi
    echo "$c,$t,${#v[@]},$m,$add,$st" >>"$out/overhead.csv"
  done
  echo "$line"
}

if want overhead; then
  echo "== p11mux's cost per call over the null backend (p11mux-load --op random, CPU time of two run lengths)"
  echo "config,threads,runs,median_cpu_ns_per_call,added_ns,status" >"$out/overhead.csv"
  for t in 1 2; do
    if [ "$quick" = 1 ]; then overhead_case "$t" 300000 1500000; else overhead_case "$t" 500000 3000000; fi
  done
  echo "== p11mux's cost per call over the null backend, by function (tests/bench/null-overhead)"
  rounds=$((runs > 7 ? runs : 7))
  if [ "$quick" = 1 ]; then rounds=3; fi
  "$null_overhead" "$p11mux" "$null" --rounds "$rounds" --count $((quick ? 50000 : 200000)) \
    --csv "$out/null-overhead.csv" | sed 's/^/  /'
fi

if want open; then
  echo "== open+close against a backend whose C_OpenSession takes 1 ms (mock)"
  for t in 1 8; do
    run_case open mock open-close per-thread "$t" direct \
      direct serialize multiplex -- MOCK_OPEN_SESSION_US=1000
  done
fi

if want shared; then
  echo "== one session shared by all threads (SoftHSM2; ratio to direct with a session per thread)"
  for op in sign-ec digest; do
    for t in 8 64; do
      run_case shared softhsm "$op" shared "$t" per-thread-direct \
        per-thread-direct direct serialize multiplex p11kit
    done
  done
fi

if want callgrind; then
  echo "== instructions per call (callgrind)"
  cg=(--build "$build" --csv "$out/callgrind.csv")
  [ "$quick" = 0 ] || cg+=(--ops random --short 1000 --long 4000)
  "$repo/tests/bench/callgrind_overhead.sh" "${cg[@]}" | sed 's/^/  /'
  # A group against the plain configuration, both multi-threaded (the
  # group's members' thread makes it so: README.md, "Several HSMs"); over
  # the mock too, whose work does not move with the addresses p11mux
  # leaves it, as SoftHSM2's secure memory registry does.
  echo "  a one-member group against the plain configuration, with --idle-thread:"
  cg=(--build "$build" --backends "softhsm mock" --configs "direct serialize group" --idle-thread)
  [ "$quick" = 0 ] && cg+=(--ops "random sign") || cg+=(--ops random --short 1000 --long 4000)
  "$repo/tests/bench/callgrind_overhead.sh" "${cg[@]}" | sed 's/^/  /'
fi

# ---- capacity: many application sessions over few HSM sessions ----
# The cases: LABEL CONFIG SESSIONS THREADS BACKEND_LIMIT BIND. The slow
# backend (the faulty module's network-HSM latency over the bench token)
# refuses sessions beyond BACKEND_LIMIT with CKR_SESSION_COUNT, and reports
# no limit in its token info: p11mux learns it. "physical" is 4 busy
# sessions driven directly (p11mux-load's setup session, idle, is the fifth);
# every other case has the limit of 4. Through p11mux, [pool] bind = BIND;
# "bind-open" is the binding before issue 13 (a backend session per open
# session), with [pool] wait_ms = 0 so that it is refused at once rather than
# after 5 s.
capacity_cases=(
  "physical direct per-thread 4 5 -"
  "direct direct per-thread 32 4 -"
  "bind-open serialize per-thread 32 4 open"
  "serialize serialize per-thread 32 4 state"
  "multiplex multiplex per-thread 32 4 state"
  "serialize serialize per-thread 256 4 state"
  "multiplex multiplex per-thread 256 4 state"
  "serialize serialize shared 64 4 state"
  "multiplex multiplex shared 64 4 state"
)

# limit_section CSV CASES LIMIT_VAR: every case of the array named CASES
# ("LABEL CONFIG SESSIONS THREADS BACKEND_LIMIT BIND") $runs times,
# interleaved (run 1 of each, then run 2...), over the slow backend with
# LIMIT_VAR=BACKEND_LIMIT; medians, and each case's ratio to the case
# labelled "physical" (median of the per-run ratios against the physical run
# of the same round). Writes $out/CSV.
limit_section() {
  # backend_limit: once named limit, it hid the global run timeout (now run_timeout).
  local csv=$1 limit_var=$3 r spec label config sessions threads backend_limit bind key p99
  local -n cases=$2
  local -A val=() p99s=() errs=() states=()
  [ -e "$slow" ] || { echo "  $slow is missing: no figures"; return 0; }
  echo "label,config,bind,sessions,threads,backend_limit,runs,median_ops_per_sec,min_ops_per_sec,max_ops_per_sec,ratio_to_physical,errors,median_p99_latency_ms,status" \
    >"$out/$csv"
  for ((r = 1; r <= runs; r++)); do
    for spec in "${cases[@]}"; do
      read -r label config sessions threads backend_limit bind <<<"$spec"
      key="$label/$sessions/$threads"
      probe slow "$config" || continue
      local -a cenv=("$limit_var=$backend_limit")
      [ "$bind" = - ] || cenv+=(P11MUX_POOL_BIND="$bind")
      [ "$bind" != open ] || cenv+=(P11MUX_POOL_WAIT_MS=0)
      run_one "${csv%.csv}" slow "$config" sign-ec "$sessions" "$threads" "$r" "${cenv[@]}"
      # A run with errors has no figure: failed ops are fast and would count.
      [ -z "$ops_s" ] || [ "$status" != ok ] || val[$key/$r]=$ops_s
      p99=$(json_number p99 <"$work/run.json" 2>/dev/null || true)
      [ -z "$ops_s" ] || [ "$status" != ok ] || [ -z "$p99" ] || p99s[$key/$r]=$p99
      errs[$key]=$((${errs[$key]:-0} + ${errors:-0}))
      [[ " ${states[$key]:-} " == *" $status "* ]] || states[$key]+="${states[$key]:+ / }$status"
    done
  done
  for spec in "${cases[@]}"; do
    read -r label config sessions threads backend_limit bind <<<"$spec"
    key="$label/$sessions/$threads"
    local -a v=() q=() l=()
    local m="" lo="" hi="" ratio="" lat="" st line
    if ! probe slow "$config"; then
      st="unavailable: ${unavailable[slow/$config]}"
    else
      st=${states[$key]:-}
      for ((r = 1; r <= runs; r++)); do
        [ -n "${val[$key/$r]:-}" ] || continue
        v+=("${val[$key/$r]}")
        [ -z "${p99s[$key/$r]:-}" ] || l+=("${p99s[$key/$r]}")
        [ "$label" = physical ] || [ -z "${val[physical/per-thread/4/$r]:-}" ] ||
          q+=("$(awk -v a="${val[$key/$r]}" -v b="${val[physical/per-thread/4/$r]}" 'BEGIN { print a / b }')")
      done
      if [ ${#v[@]} -gt 0 ]; then
        m=$(median "${v[@]}")
        lo=$(printf '%s\n' "${v[@]}" | sort -g | head -1)
        hi=$(printf '%s\n' "${v[@]}" | sort -g | tail -1)
      fi
      [ ${#q[@]} -eq 0 ] || ratio=$(printf '%.3f' "$(median "${q[@]}")")
      [ ${#l[@]} -eq 0 ] || lat=$(awk -v us="$(median "${l[@]}")" 'BEGIN { printf "%.2f", us / 1000 }')
    fi
    line="  $(printf '%-9s %-10s %3s thr  limit %s' "$label" "$sessions" "$threads" "$backend_limit")"
    [ -z "$m" ] || line+="  $(printf '%6.0f/s' "$m")${ratio:+ (${ratio}x)}  p99 ${lat:-?} ms"
    [ "${errs[$key]:-0}" = 0 ] || line+="  ${errs[$key]} errors"
    [ "$st" = ok ] || line+="  [$st]"
    echo "$line"
    echo "$label,$config,$bind,$sessions,$threads,$backend_limit,${#v[@]},$m,$lo,$hi,$ratio,${errs[$key]:-0},$lat,$st" >>"$out/$csv"
  done
}

if want capacity; then
  echo "== capacity on a network HSM (libp11mux-slow.so over SoftHSM2, 0.5 ms per crypto call, at most 4 sessions; sign-ec; ratio to the physical capacity)"
  limit_section capacity.csv capacity_cases P11MUX_FAULTY_MAX_SESSIONS
fi

# ---- groups: several HSMs as one slot (issue 15) ----
# Three tokens member-1..3 holding the same EC key (imported: same value,
# CKA_ID and label, as a vendor's cloning provisions them), each a member
# on the slow backend with at most 4 sessions per slot (its token info says
# no limit: p11mux learns it). 64 threads, each with its own session,
# signing. "physical" is one member's capacity driven directly (4 threads;
# the limit 5 for p11mux-load's idle setup session, which holds the login),
# "member" the same token through p11mux's single backend, "groupN" a group
# of the first N members, [pool] bind = state; "groupN-mux" the same group
# in multiplex mode, the 64 threads sharing one session.
groups_cases=(
  "physical member-direct per-thread 4 5 -"
  "member member-serialize per-thread 64 4 state"
  "group1 group1 per-thread 64 4 state"
  "group2 group2 per-thread 64 4 state"
  "group3 group3 per-thread 64 4 state"
  "group1-mux group1-multiplex shared 64 4 state"
  "group3-mux group3-multiplex shared 64 4 state"
)

# groups_setup: the member tokens beside the bench token, and group1..3.conf;
# once, for the groups and failover sections.
groups_made=0
groups_setup() {
  [ "$groups_made" = 0 ] || return 0
  local i members=""
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/member.pem" 2>/dev/null &&
    openssl pkey -in "$work/member.pem" -pubout -out "$work/member.pub" || return 1
  for i in 1 2 3; do
    softhsm2-util --init-token --free --label "member-$i" --so-pin 12345678 --pin 123456 >/dev/null &&
      pkcs11-tool --module "$softhsm" --token-label "member-$i" --login --pin 123456 \
        --write-object "$work/member.pem" --type privkey --id 01 --label p11mux-load-ec \
        --usage-sign >/dev/null 2>&1 &&
      pkcs11-tool --module "$softhsm" --token-label "member-$i" --login --pin 123456 \
        --write-object "$work/member.pub" --type pubkey --id 01 --label p11mux-load-ec \
        >/dev/null 2>&1 || return 1
    members+="${members:+, }slow/label:member-$i"
    printf '[backend.slow]\nmodule = %s\n[group.signing]\nmembers = %s\n' "$slow" "$members" \
      >"$work/group$i.conf"
  done
  groups_made=1
}

if want groups; then
  echo "== groups: 1, 2 and 3 members on the slow backend (0.5 ms per crypto call, at most 4 sessions per member; sign-ec, 64 threads; ratio to one member's physical capacity)"
  if [ -e "$slow" ] && groups_setup; then
    limit_section groups.csv groups_cases P11MUX_FAULTY_MAX_SLOT_SESSIONS
  else
    echo "  the member tokens could not be made (softhsm2-util, pkcs11-tool, openssl): no figures"
  fi
fi

# ---- failover: a member dies under load (issue 15) ----
# The group of 3 (groups_setup) in serialize mode, recovery_interval_s = 1, 64
# threads signing for $failover_duration s after a warmup of 1 s. The slow
# backend removes member-2's token $failover_kill s after its C_Initialize
# (p11mux's, at p11mux-load's start) and brings it back $failover_back s after
# it (P11MUX_FAULTY_SCHEDULE); it writes the wall-clock time of each to
# stderr, and p11mux-load's --timeline (ops and errors per 100 ms) gives the
# measured phase's start, so the times below are measured, not assumed.
# p11mux's /metrics (a unix socket) is polled every 0.2 s for the member's
# calls. Single-part operations whose member died between C_SignInit and
# C_Sign fail until p11mux replays them: they are counted, not hidden.
failover_duration=12
failover_kill=5
failover_back=9
failover_member=member-2

# failover_analyse JSON ERR METRICS TIMELINE_CSV RUN: prints the run's row of
# failover.csv and writes its timeline.
failover_analyse() {
  python3 - "$@" <<'PY'
import json, math, re, statistics, sys
jpath, errpath, mpath, tpath, run = sys.argv[1:6]
j = json.load(open(jpath))
t = j["timeline"]
step = t["interval_ms"] / 1000.0
ops = [n / step for n in t["ops_per_interval"]]
errs = t["errors_per_interval"]
start = t["start_unix_ms"] / 1000.0
events = {}
for line in open(errpath):
    m = re.search(r"schedule: [0-9.]+:slot=[0-9]+:(\w+) at unix_ms ([0-9]+)", line)
    if m:
        events[m.group(1)] = int(m.group(2)) / 1000.0 - start
kill, back = events.get("removed"), events.get("back")
# The last interval may be cut short by the window's end: left out.
full = len(ops) - 1
with open(tpath, "a") as out:
    for i in range(full):
        out.write(f"{run},{i * step:.3f},{ops[i]:.0f},{errs[i]}\n")
def median(xs):
    return statistics.median(xs) if xs else None
def fmt(x, f="{:.2f}"):
    return "" if x is None else f.format(x)
base = back_first = recovery = lowest = degraded = after = None
if kill is not None:
    base = median([ops[i] for i in range(full) if (i + 1) * step <= kill])
    end = back if back is not None else full * step
    first = math.ceil(kill / step)  # the first interval wholly after the kill
    last = min(full, int(end / step))  # the first one the return touches
    lowest = min(ops[first:min(last, first + int(round(1 / step)))], default=None)
    # Back to 2/3 of the throughput before the kill, and staying there until
    # the member returns, by the mean of 0.5 s windows (sliding, in steps of
    # one interval: one slow 100 ms interval on a shared machine is noise).
    w = max(1, int(round(0.5 / step)))
    low = [i for i in range(first, last - w + 1) if statistics.mean(ops[i:i + w]) < base * 2 / 3]
    # With two members of three left, the level held is about 2/3 when the
    # members bound the throughput: also the first time it is back there.
    if low and low[0] == first:
        back_first = next(((i + w) * step - kill for i in range(first, last - w + 1) if i not in low), None)
    else:
        back_first = 0.0
    # Back at the end of the first window at or above 2/3 (after the last low
    # one, for good); 0 if none was below.
    recovery = max(0.0, (low[-1] + 1 + w) * step - kill) if low else 0.0
    if low and low[-1] + w >= last:
        recovery = None  # not back before the member returned
    degraded = median([ops[i] for i in range(first, last) if i * step >= kill + (recovery or 0)])
if back is not None:
    after = median([ops[i] for i in range(full) if i * step >= back + 1.0])
# The member's calls from /metrics: (seconds into the run, calls).
samples = []
for line in open(mpath):
    parts = line.split()
    if len(parts) == 2:
        samples.append((float(parts[0]) - start, float(parts[1])))
rates = [(b[0], (b[1] - a[1]) / (b[0] - a[0])) for a, b in zip(samples, samples[1:]) if b[0] > a[0]]
member_base = median([r for s, r in rates if 0 <= s <= (kill if kill is not None else 0)])
first_call = carries = None
if back is not None:
    later = [(s, r) for s, r in rates if s > back]
    first_call = next((s - back for s, r in later if r > 0), None)
    if member_base:
        carries = next((s - back for s, r in later if r >= member_base / 2), None)
# Which call failed matters: C_SignInit (nothing started) or C_Sign (an
# operation lost with its member, until p11mux replays it).
by_rv = ";".join(f"{e['call']} {e['rv']}={e['count']}" for e in j.get("error_details", []))
ratio = None if degraded is None or not base else degraded / base
print(",".join([run, fmt(base, "{:.0f}"), fmt(kill), fmt(back), str(j["errors"]), by_rv,
                fmt(back_first), fmt(recovery), fmt(lowest, "{:.0f}"), fmt(degraded, "{:.0f}"), fmt(ratio), fmt(after, "{:.0f}"),
                fmt(member_base, "{:.0f}"), fmt(first_call), fmt(carries), fmt(j["ops_per_sec"], "{:.0f}")]))
PY
}

if want failover; then
  echo "== failover: a group of 3 members on the slow backend, $failover_member's token removed under load (sign-ec, 64 threads, ${failover_duration} s; serialize, recovery_interval_s = 1)"
  if [ ! -e "$slow" ] || ! groups_setup; then
    echo "  the member tokens could not be made (softhsm2-util, pkcs11-tool, openssl): no figures"
  elif ! probe slow group3; then
    :
  else
    fo_slot=$("$load" --module "$softhsm" --list-tokens |
      awk -v l="'$failover_member'" '/^slot / { s = $2 } $1 == "token" && $2 == l { print s }')
    echo "run,ops_per_sec_before,kill_s,back_s,failed_ops,errors_by_rv,first_back_s,recovery_s,ops_per_sec_lowest,ops_per_sec_degraded,ratio_degraded,ops_per_sec_after_back,member_calls_per_sec_before,member_first_call_s,member_carries_load_s,ops_per_sec_run,status" \
      >"$out/failover.csv"
    echo "run,t_s,ops_per_sec,errors" >"$out/failover-timeline.csv"
    echo "run,unix_s,member_calls_total" >"$out/failover-member-calls.csv"
    for ((r = 1; r <= runs; r++)); do
      fo_sock="$work/metrics-$r.sock"
      : >"$work/member-calls.txt"
      # The member's calls, with the wall clock, until the run ends (no
      # answer before p11mux listens: not fatal here).
      (
        while :; do
          n=$(curl -s --max-time 1 --unix-socket "$fo_sock" http://localhost/metrics 2>/dev/null |
            awk -v m="label:$failover_member\"" 'index($0, "p11mux_member_calls_total{") == 1 && index($0, m) { print $2 }') || n=""
          [ -z "$n" ] || echo "$EPOCHREALTIME $n" >>"$work/member-calls.txt"
          sleep 0.2
        done
      ) &
      fo_poller=$!
      load_extra=(--timeline 100)
      duration=$failover_duration warmup=1 run_one failover slow group3 sign-ec per-thread 64 "$r" \
        P11MUX_FAULTY_MAX_SLOT_SESSIONS=4 P11MUX_POOL_BIND=state \
        P11MUX_GROUP_SIGNING_RECOVERY_INTERVAL_S=1 P11MUX_METRICS_LISTEN="unix:$fo_sock" \
        P11MUX_FAULTY_SCHEDULE="$failover_kill:slot=$fo_slot:removed,$failover_back:slot=$fo_slot:back"
      load_extra=()
      kill "$fo_poller" 2>/dev/null || true
      wait "$fo_poller" 2>/dev/null || true
      # The faulty module's schedule lines and anything else on stderr.
      cp "$work/run.err" "$out/failover-run$r.log"
      awk -v r="$r" '{ print r "," $1 "," $2 }' "$work/member-calls.txt" >>"$out/failover-member-calls.csv"
      if [ -z "$ops_s" ]; then
        echo "  run $r: no figures [$status]"
        echo "$r,,,,,,,,,,,,,,,,$status" >>"$out/failover.csv"
        continue
      fi
      fo_row=$(failover_analyse "$work/run.json" "$work/run.err" "$work/member-calls.txt" \
        "$out/failover-timeline.csv" "$r")
      echo "$fo_row,$status" >>"$out/failover.csv"
      IFS=, read -r _ fo_base fo_kill fo_back fo_failed fo_by_rv fo_first_back fo_recovery fo_lowest fo_degraded fo_ratio fo_after _ fo_first fo_carries _ <<<"$fo_row"
      echo "  run $r: before the kill ${fo_base:-?}/s; killed at ${fo_kill:-?} s, back at ${fo_back:-?} s;" \
        "failed ops $fo_failed${fo_by_rv:+ ($fo_by_rv)}"
      [ -n "$fo_recovery" ] && fo_recovery="$fo_recovery s after the kill" || fo_recovery="not before the return"
      [ -n "$fo_carries" ] && fo_carries="$fo_carries s after its return" || fo_carries="not within the run"
      [ -z "$fo_first" ] || fo_first="$fo_first s after its return"
      echo "         lowest 100 ms in the second after the kill ${fo_lowest:-?}/s; throughput >= 2/3 first" \
        "${fo_first_back:-never} s after the kill, for good $fo_recovery (then ${fo_degraded:-?}/s, ${fo_ratio:-?}x);" \
        "after the return ${fo_after:-?}/s; $failover_member carries load $fo_carries (first call: ${fo_first:-none})"
    done
  fi
fi

# ---- TLS handshakes through servers with the key on the token ----
# One server at a time on 127.0.0.1, its key loaded by the OpenSSL pkcs11
# engine (libp11) from the bench token; $tls_clients openssl s_time processes
# make full handshakes (-new: no resumption; TLSv1.3, no tickets) for
# $tls_duration s. stunnel connects to a port nobody listens on: the
# handshake comes first, and the figure is handshakes, not the backend.
tls_dir="$work/tls"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# tls_engine_conf NAME MODULE: an openssl.cnf loading the engine for MODULE.
tls_engine_conf() {
  openssl_engine_conf "$engine" "$2" 1 >"$tls_dir/openssl-$1.cnf"
}

tls_key_uri() { echo "pkcs11:token=bench;object=tls-$1;type=private;pin-value=123456"; }

# tls_setup: the keys on the bench token and their certificates; fails
# (no TLS figures) when a program is missing.
tls_setup() {
  local tool f key type id=0
  for tool in nginx stunnel4 openssl pkcs11-tool python3; do
    command -v "$tool" >/dev/null || { echo "  $tool not installed (scripts/setup.sh): no TLS figures"; return 1; }
  done
  for f in "$engine" "$slow"; do
    [ -e "$f" ] || { echo "  $f is missing: no TLS figures"; return 1; }
  done
  mkdir -p "$tls_dir"
  tls_engine_conf softhsm "$softhsm"
  for key in "${tls_keys[@]}"; do
    case $key in
      ec) type=EC:prime256v1 ;;
      rsa) type=rsa:2048 ;;
      *) echo "bench.sh: unknown TLS key '$key' (ec, rsa)" >&2; return 1 ;;
    esac
    id=$((id + 1))
    pkcs11-tool --module "$softhsm" --token-label bench --login --pin 123456 --keypairgen \
      --key-type "$type" --label "tls-$key" --id "7e0$id" >"$tls_dir/keygen.log" 2>&1 &&
      OPENSSL_CONF="$tls_dir/openssl-softhsm.cnf" openssl req -new -x509 -days 30 -subj /CN=localhost \
        -engine pkcs11 -keyform engine -key "$(tls_key_uri "$key")" -out "$tls_dir/$key.pem" \
        >>"$tls_dir/keygen.log" 2>&1 ||
      { echo "  cannot make the TLS key $key:"; sed 's/^/    /' "$tls_dir/keygen.log"; return 1; }
  done
}

# tls_select BACKEND CONFIG: $module for the engine and $menv for the server.
# The slow backend allows 4 sessions per process, like a network HSM's limit.
tls_select() {
  local backend_path=$softhsm
  menv=()
  if [ "$1" = slow ]; then
    backend_path=$slow
    menv=(P11MUX_FAULTY_MAX_SESSIONS=4)
    [ -z "$tls_slow_latency" ] || menv+=(P11MUX_FAULTY_LATENCY="$tls_slow_latency")
  fi
  case $2 in
    direct) module=$backend_path ;;
    *) module=$p11mux; menv+=(P11MUX_MODULE="$backend_path" P11MUX_SESSION_MODE="$2") ;;
  esac
}

# tls_start SERVER BACKEND CONFIG KEY: starts the server in $tls_dir/run;
# sets $tls_pid and $tls_port, or fails with the reason in $tls_error.
tls_start() {
  local server=$1 key=$4 run="$tls_dir/run" i
  tls_select "$2" "$3"
  rm -rf "$run"
  mkdir -p "$run"
  tls_engine_conf run "$module"
  tls_port=$(free_port)
  if [ "$server" = nginx ]; then
    # The workers' environment is cleared: p11mux in them starts from the
    # master's configuration.
    nginx_conf "$run" "$tls_port" "$tls_dir/$key.pem" "$(tls_key_uri "$key")" error \
      "ssl_protocols TLSv1.3" >"$run/nginx.conf"
    env "${menv[@]}" OPENSSL_CONF="$tls_dir/openssl-run.cnf" nginx -p "$run" -c "$run/nginx.conf" \
      >"$run/server.log" 2>&1 &
  else
    cat >"$run/stunnel.conf" <<EOF
foreground = yes
pid = $run/stunnel.pid
debug = crit
engine = pkcs11
engineCtrl = MODULE_PATH:$module
engineCtrl = PIN:123456
[tls]
engineId = pkcs11
accept = 127.0.0.1:$tls_port
connect = 127.0.0.1:$(free_port)
cert = $tls_dir/$key.pem
key = pkcs11:token=bench;object=tls-$key;type=private
sslVersion = TLSv1.3
sessionCacheSize = 1
options = NO_TICKET
EOF
    env "${menv[@]}" stunnel4 "$run/stunnel.conf" >"$run/server.log" 2>&1 &
  fi
  tls_pid=$!
  for ((i = 0; i < 150; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$tls_port") 2>/dev/null && return 0
    kill -0 "$tls_pid" 2>/dev/null || break
    sleep 0.1
  done
  tls_error=$(cat "$run/server.log" "$run/error.log" 2>/dev/null | grep -v '^\[ \]' | head -1 | tr ',' ';' || true)
  tls_error=${tls_error:-does not listen}
  tls_stop
  return 1
}

tls_stop() {
  local i
  [ -n "$tls_pid" ] || return 0
  kill "$tls_pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do kill -0 "$tls_pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$tls_pid" 2>/dev/null || true
  wait "$tls_pid" 2>/dev/null || true
  tls_pid=""
}

# tls_client PORT DEADLINE: s_time until DEADLINE (epoch seconds), again after
# a failed handshake (s_time stops at the first); prints "handshakes failures".
tls_client() {
  local n=0 e=0 left out k
  while left=$(($2 - $(date +%s))); [ "$left" -gt 0 ]; do
    if ! out=$(timeout -k 2 $((left + 20)) openssl s_time -connect "127.0.0.1:$1" -new -time "$left" 2>&1); then
      e=$((e + 1))
      sleep 0.1
    fi
    k=$(sed -n 's/^\([0-9]*\) connections in [0-9.]*s;.*/\1/p' <<<"$out" | head -1 || true)
    n=$((n + ${k:-0}))
  done
  echo "$n $e"
}

# tls_measure PORT SECONDS: $tls_clients clients at once; sets $hs_s
# (handshakes per second of wall time) and $hs_err (failed handshakes).
tls_measure() {
  local c t0 t1 deadline n=0 e=0 a b
  local -a pids=()
  t0=$(date +%s.%N)
  deadline=$(($(date +%s) + $2))
  for ((c = 0; c < tls_clients; c++)); do
    tls_client "$1" "$deadline" >"$tls_dir/client.$c" &
    pids+=($!)
  done
  wait "${pids[@]}"
  t1=$(date +%s.%N)
  for ((c = 0; c < tls_clients; c++)); do
    read -r a b <"$tls_dir/client.$c"
    n=$((n + a))
    e=$((e + b))
  done
  hs_s=$(awk -v n="$n" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", n / (b - a) }')
  hs_err=$e
}

# tls_case BACKEND KEY SERVER: every configuration $runs times, interleaved,
# each on a freshly started server with a warm-up second (logins, the
# sessions the server keeps); the medians, and the ratio to direct (median
# of the per-run ratios).
tls_case() {
  local backend=$1 key=$2 server=$3 c r
  local -A val=() errs=() states=()
  for ((r = 1; r <= runs; r++)); do
    for c in direct serialize multiplex; do
      local st=ok
      hs_err=""
      if tls_start "$server" "$backend" "$c" "$key"; then
        tls_measure "$tls_port" 1
        tls_measure "$tls_port" "$tls_duration"
        kill -0 "$tls_pid" 2>/dev/null || st="server died"
        tls_stop
        val[$c/$r]=$hs_s
        errs[$c]=$((${errs[$c]:-0} + hs_err))
        [ "$hs_err" = 0 ] || [ "$st" != ok ] || st=errors
      else
        st="no start: $tls_error"
      fi
      echo "tls,$backend,$key,$server,$c,$r,${val[$c/$r]:-},$hs_err,$st" >>"$out/tls-runs.csv"
      [[ " ${states[$c]:-} " == *" $st "* ]] || states[$c]+="${states[$c]:+ / }$st"
    done
  done
  local line m lo hi ratio
  line="  $(printf '%-7s %-3s %-7s' "$backend" "$key" "$server")"
  for c in direct serialize multiplex; do
    local -a v=() q=()
    m="" lo="" hi="" ratio=""
    for ((r = 1; r <= runs; r++)); do
      [ -n "${val[$c/$r]:-}" ] || continue
      v+=("${val[$c/$r]}")
      [ "$c" = direct ] || [ -z "${val[direct/$r]:-}" ] ||
        q+=("$(awk -v a="${val[$c/$r]}" -v b="${val[direct/$r]}" 'BEGIN { print (b > 0) ? a / b : 0 }')")
    done
    if [ ${#v[@]} -gt 0 ]; then
      m=$(median "${v[@]}")
      lo=$(printf '%s\n' "${v[@]}" | sort -g | head -1)
      hi=$(printf '%s\n' "${v[@]}" | sort -g | tail -1)
    fi
    [ ${#q[@]} -eq 0 ] || ratio=$(printf '%.2f' "$(median "${q[@]}")")
    line+="  $c ${m:+$(printf '%.0f/s' "$m")}${ratio:+ (${ratio}x)}"
    [ "${states[$c]}" = ok ] || line+=" [${states[$c]}; ${errs[$c]:-0} failed]"
    echo "$backend,$key,$server,$c,${#v[@]},$m,$lo,$hi,$ratio,${errs[$c]:-0},${states[$c]}" >>"$out/tls.csv"
  done
  echo "$line"
}

if want tls; then
  echo "== TLS handshakes per second, key on the token ($tls_clients s_time clients, ${tls_duration} s per run; ratio to direct)"
  echo "backend,key,server,config,runs,median_handshakes_per_sec,min,max,ratio_to_direct,failed_handshakes,status" >"$out/tls.csv"
  echo "section,backend,key,server,config,run,handshakes_per_sec,failed_handshakes,status" >"$out/tls-runs.csv"
  if tls_setup; then
    for backend in "${tls_backends[@]}"; do
      for key in "${tls_keys[@]}"; do
        for server in "${tls_servers[@]}"; do
          tls_case "$backend" "$key" "$server"
        done
      done
    done
  fi
fi

load_end=$(cut -d' ' -f1-3 /proc/loadavg)
elapsed=$(($(date +%s) - started))
echo "bench: done in $((elapsed / 60)) min $((elapsed % 60)) s; load average now $load_end"

# ---- report ----
cat >"$out/meta.env" <<EOF
date='$(date -u '+%Y-%m-%d %H:%M UTC')'
commit='$(git -C "$src" describe --always --dirty 2>/dev/null || echo "unknown: $src")'
cpu='$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//') x $(nproc)'
softhsm='$(dpkg-query -W -f='${Version}' softhsm2 2>/dev/null || echo '?')'
p11kit='$(dpkg-query -W -f='${Version}' p11-kit-modules 2>/dev/null || echo '?')'
runs='$runs'
duration='$duration'
warmup='$warmup'
load_start='$load_start'
load_end='$load_end'
elapsed='$elapsed'
EOF
"$repo/tests/bench/report.sh" "$out"
if [ -s "$out/capacity.csv" ] && [ "$(wc -l <"$out/capacity.csv")" -gt 1 ]; then
  {
    echo
    echo "## Capacity on a network HSM"
    echo
    echo "libp11mux-slow.so over SoftHSM2: 0.5 ms per crypto call, so at most 1,000 ECDSA"
    echo "signatures (C_SignInit + C_Sign) per second per backend session, and at most 4"
    echo "sessions (CKR_SESSION_COUNT beyond; its token info reports no limit, so p11mux"
    echo "learns it). The physical capacity is 4 threads each driving its own session"
    echo "directly. Through p11mux, \`[pool] bind = state\`. Median of $runs run(s) of ${duration} s;"
    echo "the ratio is to the physical capacity of the same round; p99 latency includes any"
    echo "wait for a backend session."
    echo
    echo "| case | module | bind | sessions | threads | backend limit | ops/s | ratio | errors | p99 latency | status |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|"
    awk -F, 'NR > 1 {
      ops = ($8 == "") ? "n/a" : sprintf("%.0f", $8)
      ratio = ($11 == "") ? "" : sprintf("%.2fx", $11)
      lat = ($13 == "") ? "" : $13 " ms"
      module = ($2 == "direct") ? "slow directly" : "p11mux " $2
      printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, module, $3, $4, $5, $6, ops, ratio, $12, lat, $14
    }' "$out/capacity.csv"
  } >>"$out/results.md"
fi
if [ -s "$out/groups.csv" ] && [ "$(wc -l <"$out/groups.csv")" -gt 1 ]; then
  {
    echo
    echo "## Several HSMs as one slot"
    echo
    echo "Members: SoftHSM2 tokens holding the same imported EC key, each on"
    echo "libp11mux-slow.so (0.5 ms per crypto call, at most 4 sessions per token). 64"
    echo "threads, each with its own session, signing (C_SignInit + C_Sign); groups of the"
    echo "first N members in serialize mode, \`[pool] bind = state\`; groupN-mux the same in"
    echo "multiplex mode, the threads sharing one session. \"physical\" is one member"
    echo "driven directly by 4 threads. Median of $runs run(s) of ${duration} s; scaling is"
    echo "groupN / (N x group1) of the medians, and groupN-mux / (N x group1-mux) (goal: 0.9"
    echo "or more)."
    echo
    echo "| case | sessions | threads | limit per member | ops/s | ratio to physical | scaling | errors | p99 latency | status |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
    awk -F, 'NR > 1 {
      ops = ($8 == "") ? "n/a" : sprintf("%.0f", $8)
      ratio = ($11 == "") ? "" : sprintf("%.2fx", $11)
      lat = ($13 == "") ? "" : $13 " ms"
      if ($1 == "group1") one = $8
      if ($1 == "group1-mux") one_mux = $8
      scaling = ""
      if ($1 ~ /^group[0-9]$/ && one != "" && $8 != "") scaling = sprintf("%.2f", $8 / (substr($1, 6) * one))
      if ($1 ~ /^group[0-9]-mux$/ && one_mux != "" && $8 != "") scaling = sprintf("%.2f", $8 / (substr($1, 6, 1) * one_mux))
      printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $4, $5, $6, ops, ratio, scaling, $12, lat, $14
    }' "$out/groups.csv"
  } >>"$out/results.md"
fi
if [ -s "$out/failover.csv" ] && [ "$(wc -l <"$out/failover.csv")" -gt 1 ]; then
  {
    echo
    echo "## Failover under load"
    echo
    echo "The group of 3 members above in serialize mode, \`recovery_interval_s = 1\`; 64"
    echo "threads signing (C_SignInit + C_Sign) for ${failover_duration} s; $failover_member's token removed"
    echo "(P11MUX_FAULTY_SCHEDULE) at \"kill\" and back at \"back\" (seconds into the measured"
    echo "run). \"before\" is the median throughput of the 100 ms intervals before the kill;"
    echo "\"lowest 100 ms\" the lowest throughput in the second after the kill; \"2/3 first\""
    echo "the time from the kill until throughput (0.5 s sliding mean) is at least 2/3 of"
    echo "\"before\" again, \"2/3 for good\" until it stays there until the member returns"
    echo "(0: it never fell below; two members of three hold about 2/3 when the members"
    echo "bound the throughput, so that one is at the mercy of noise);"
    echo "\"degraded\" the median from then to the return; \"carries load\" the time from its return"
    echo "until its calls (p11mux's /metrics, polled every 0.2 s) reach half their rate"
    echo "before the kill. Failed ops are those the application saw (goal: 0)."
    echo
    echo "| run | before | kill | back | failed ops | by call and CKR | lowest 100 ms | 2/3 first | 2/3 for good | degraded | after return | carries load | status |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    awk -F, 'NR > 1 {
      fst = ($7 == "") ? "not before the return" : $7 " s"
      rec = ($8 == "") ? "not before the return" : $8 " s"
      deg = ($10 == "") ? "" : $10 "/s (" $11 "x)"
      car = ($15 == "") ? "not within the run" : $15 " s"
      gsub(";", ", ", $6)
      printf "| %s | %s/s | %s s | %s s | %s | %s | %s/s | %s | %s | %s | %s/s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $9, fst, rec, deg, $12, car, $17
    }' "$out/failover.csv"
  } >>"$out/results.md"
fi
if [ -s "$out/tls.csv" ] && [ "$(wc -l <"$out/tls.csv")" -gt 1 ]; then
  {
    echo
    echo "## TLS handshakes per second"
    echo
    echo "Full handshakes (TLSv1.3, no resumption), the server key on the token through"
    echo "the OpenSSL pkcs11 engine; $tls_clients \`openssl s_time -new\` clients for ${tls_duration} s,"
    echo "median of $runs run(s), ratio to direct. nginx with 2 workers, stunnel with a"
    echo "thread per connection. \"slow\" is libp11mux-slow.so over SoftHSM2, at most 4"
    echo "sessions per process, latency (µs) ${tls_slow_latency:-open=2000,close=1000,login=2000,crypto=500}."
    echo
    echo "| backend | key | server | direct | serialize | multiplex |"
    echo "|---|---|---|---|---|---|"
    awk -F, 'NR > 1 {
      k = $1 "|" $2 "|" $3
      if (!(k in seen)) { seen[k] = 1; order[++n] = k }
      cell = ($6 == "") ? "n/a" : sprintf("%.0f/s", $6)
      if ($9 != "") cell = cell sprintf(" (%.2fx)", $9)
      if ($11 != "ok") cell = cell " [" $11 "; " $10 " failed]"
      c[k "|" $4] = cell
    } END {
      for (i = 1; i <= n; i++) {
        split(order[i], p, "|")
        printf "| %s | %s | %s | %s | %s | %s |\n", p[1], p[2], p[3],
          c[order[i] "|direct"], c[order[i] "|serialize"], c[order[i] "|multiplex"]
      }
    }' "$out/tls.csv"
  } >>"$out/results.md"
fi
if [ "$publish" = 1 ]; then
  mkdir -p "$repo/docs/bench"
  for f in results.md results.csv callgrind.csv capacity.csv groups.csv failover.csv tls.csv throughput.png; do
    [ ! -e "$out/$f" ] || cp "$out/$f" "$repo/docs/bench/"
  done
  echo "bench: copied to docs/bench/"
fi
