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
A full run takes about 12 minutes on 2 cores; --quick about 2.

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

Options:
  --quick           1 run of 0.7 s per case, callgrind on C_GenerateRandom only
  --runs N          runs per case, the median is reported (default 3)
  --duration S      measured seconds per run (default 1.5)
  --warmup S        unmeasured seconds before each run (default 0.5)
  --only LIST       sections to run, comma-separated (default: all)
  --ops LIST        matrix ops (default random,digest,sign-ec,sign-rsa,open-close)
  --threads LIST    matrix thread counts (default 1,2,8,64)
  --configs LIST    direct,serialize,multiplex,p11kit (default: all)
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
runs=3
duration=1.5
warmup=0.5
quick=0
sections="matrix,overhead,open,shared,callgrind"
ops="random,digest,sign-ec,sign-rsa,open-close"
threads_list="1,2,8,64"
configs="direct,serialize,multiplex,p11kit"
out="$repo/bench-results"
build="$repo/build/release"
do_build=1
publish=0
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1; runs=1; duration=0.7; warmup=0.2; shift ;;
    --runs) runs=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --only) sections=$2; shift 2 ;;
    --ops) ops=$2; shift 2 ;;
    --threads) threads_list=$2; shift 2 ;;
    --configs) configs=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --no-build) do_build=0; shift ;;
    --publish) publish=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "bench.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "bench.sh: --runs wants a positive number" >&2; exit 2; }
IFS=, read -r -a ops <<<"$ops"
IFS=, read -r -a threads_list <<<"$threads_list"
IFS=, read -r -a configs <<<"$configs"
want() { [[ ",$sections," == *",$1,"* ]]; }
for s in ${sections//,/ }; do
  [[ " matrix overhead open shared callgrind " == *" $s "* ]] ||
    { echo "bench.sh: unknown section '$s' (see --help)" >&2; exit 2; }
done

# ---- build and paths ----
if [ "$do_build" = 1 ]; then
  [ -f "$build/CMakeCache.txt" ] ||
    cmake -S "$repo" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  cmake --build "$build" --target p11mux p11mux-load p11mux-mock p11mux-null call-loop \
    null-overhead p11kit-isolate >/dev/null
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
softhsm=/usr/lib/softhsm/libsofthsm2.so
p11kit=/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so
for f in "$load" "$p11mux" "$mock" "$null" "$null_overhead" "$shim" "$softhsm" "$p11kit"; do
  [ -e "$f" ] || { echo "bench.sh: $f is missing (scripts/setup.sh, then build; see --help)" >&2; exit 2; }
done
command -v gnuplot >/dev/null || echo "bench.sh: gnuplot not installed (scripts/setup.sh): no chart" >&2

mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
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
limit=$(awk -v d="$duration" -v w="$warmup" 'BEGIN { printf "%d", d + w + 60 }')

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
    env "${menv[@]}" "$@" timeout -k 5 "$limit" "$load" --module "$module" "${token[@]}" \
      --op "$op" --threads "$threads" --sessions "${sessions_of[$config]:-$sessions}" --warmup "$warmup" \
      --duration "$duration" --quiet --json >"$json" 2>"$err"
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
if [ "$publish" = 1 ]; then
  mkdir -p "$repo/docs/bench"
  for f in results.md results.csv callgrind.csv throughput.png; do
    [ ! -e "$out/$f" ] || cp "$out/$f" "$repo/docs/bench/"
  done
  echo "bench: copied to docs/bench/"
fi
