#!/usr/bin/env bash
# Turns the CSV files of scripts/bench.sh into results.md (tables and the
# targets of issue 5, marked pass or miss, as information) and throughput.png.
# Called by scripts/bench.sh; run it alone to redo the report from the CSVs.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: tests/bench/report.sh DIR

Reads DIR/results.csv, DIR/overhead.csv, DIR/callgrind.csv and DIR/meta.env (written by
scripts/bench.sh), writes DIR/results.md and DIR/throughput.png (if gnuplot is
installed) and prints the targets table.
EOF
}
case ${1:-} in
  -h | --help) usage; exit 0 ;;
  "") usage >&2; exit 2 ;;
esac
dir=$1
[ -f "$dir/results.csv" ] || { echo "report.sh: no $dir/results.csv" >&2; exit 2; }

# ---- load the results ----
# By "section/backend/config/op/sessions/threads": median ops/s, ratio,
# status, errors.
declare -A med=() ratio=() stat=() errs=()
declare -a matrix_ops=() matrix_threads=()
while IFS=, read -r section backend config op sessions threads _runs m _lo _hi r _to e f st; do
  [ "$section" != section ] || continue
  k="$section/$backend/$config/$op/$sessions/$threads"
  med[$k]=$m
  ratio[$k]=$r
  stat[$k]=$st
  errs[$k]=$((${e:-0} + ${f:-0}))
  if [ "$section" = matrix ]; then
    [[ " ${matrix_ops[*]} " == *" $op "* ]] || matrix_ops+=("$op")
    [[ " ${matrix_threads[*]} " == *" $threads "* ]] || matrix_threads+=("$threads")
  fi
done <"$dir/results.csv"
declare -A instr=() added=() cgstat=()
if [ -f "$dir/callgrind.csv" ]; then
  while IFS=, read -r backend config call per add st; do
    [ "$backend" != backend ] || continue
    instr[$backend/$config/$call]=$per
    added[$backend/$config/$call]=$add
    cgstat[$backend/$config/$call]=$st
  done <"$dir/callgrind.csv"
fi
# overhead.csv: by "config/threads": CPU ns per call, added ns, status.
declare -A cpu_ns=() cpu_add=() cpu_stat=()
if [ -f "$dir/overhead.csv" ]; then
  while IFS=, read -r config threads _runs m add st; do
    [ "$config" != config ] || continue
    cpu_ns[$config/$threads]=$m
    cpu_add[$config/$threads]=$add
    cpu_stat[$config/$threads]=$st
  done <"$dir/overhead.csv"
fi
date="" commit="" cpu="" softhsm="" p11kit="" runs="" duration="" warmup="" load_start="" load_end="" elapsed=""
# shellcheck disable=SC1091
[ ! -f "$dir/meta.env" ] || source "$dir/meta.env"

# ---- formatting ----
configs=(direct serialize multiplex p11kit)
declare -A title=([direct]="SoftHSM2 direct" [serialize]="p11mux serialize" [multiplex]="p11mux multiplex"
  [p11kit]="p11-kit-proxy")
declare -A op_title=([random]="random (C_GenerateRandom 32 B)" [digest]="digest (SHA-256)"
  [sign-ec]="sign-ec (ECDSA P-256)" [sign-rsa]="sign-rsa (RSA-2048 PKCS#1)" [open-close]="open-close")

thousands() { sed ':a;s/\B[0-9]\{3\}\>/,&/;ta'; }
int() { printf '%.0f' "$1" | thousands; }
# A ratio as "0.94x", "12.3x", "2,530x" ("?x" if missing): two decimals are
# already more than the noise allows.
x() {
  [ -n "${1:-}" ] || { echo "?x"; return; }
  awk -v r="$1" 'BEGIN { printf (r >= 100 ? "%.0f" : r >= 10 ? "%.1f" : "%.2f"), r }' | thousands
  printf 'x'
}
# One table cell for key K: "12,345 (0.98x)", or what happened instead.
cell() {
  local k=$1 st=${stat[$1]:-}
  case $st in
    "") echo "" ;;
    ok) echo "$(int "${med[$k]}")${ratio[$k]:+ ($(x "${ratio[$k]}"))}" ;;
    unavailable*) echo "unavailable" ;;
    crash*) echo "**crash** (${st//crash /})" ;;
    *) echo "${med[$k]:+$(int "${med[$k]}") }$st" ;;
  esac
}
has() { [ -n "${stat[$1]:-}" ]; }

ge() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a + 0 >= b + 0) }'; }
div() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
verdict() { if [ "$1" = 0 ]; then echo pass; else echo "**miss**"; fi; }  # number of misses
meets() { if "$@"; then echo pass; else echo "**miss**"; fi; }            # a test command

# ---- Markdown ----
report() {
  echo "# p11mux benchmark results"
  echo
  echo "${date:-?}, commit \`${commit:-?}\`, ${cpu:-?}, SoftHSM2 ${softhsm:-?}, p11-kit ${p11kit:-?}."
  echo "Each figure is the median of ${runs:-?} run(s) of ${duration:-?} s (after ${warmup:-?} s of warm-up)"
  echo "of \`p11mux-load\`, the configurations' runs interleaved. Load average ${load_start:-?} at the start,"
  echo "${load_end:-?} at the end (the machine is shared: wall-clock figures are noisy; the instruction"
  echo "counts are not). Made by \`scripts/bench.sh\` in ${elapsed:-?} s; every run is in runs.csv."

  if [ ${#matrix_ops[@]} -gt 0 ]; then
    echo
    echo "## Throughput over SoftHSM2, one session per thread"
    echo
    echo "ops/s (ratio to SoftHSM2 called directly: the median of the ratios of runs made back to back,"
    echo "which on a loaded machine can differ from the ratio of the two medians)"
    echo
    echo "| op | threads | ${title[direct]} | ${title[serialize]} | ${title[multiplex]} | ${title[p11kit]} |"
    echo "|---|--:|--:|--:|--:|--:|"
    for op in "${matrix_ops[@]}"; do
      for t in "${matrix_threads[@]}"; do
        printf '| %s | %s |' "$op" "$t"
        for c in "${configs[@]}"; do printf ' %s |' "$(cell "matrix/softhsm/$c/$op/per-thread/$t")"; done
        echo
      done
    done
  fi

  if [ -n "${cpu_stat[direct/1]:-}" ]; then
    echo
    echo "## p11mux's cost per call over the null backend"
    echo
    echo "\`p11mux-load --op random\` over the null backend (\`libp11mux-null.so\`: every call returns at once):"
    echo "CPU time per call (user + system, all threads; two run lengths so start-up cancels), and what"
    echo "p11mux adds (median of the per-run differences). CPU time, because on a shared machine a"
    echo "process's share of the CPU, and so its wall-clock rate, varies by far more than 50 ns a call."
    echo "The figures include the tool's own per-op bookkeeping, the same in every column."
    echo
    echo "| threads | null direct | ${title[serialize]} | ${title[multiplex]} |"
    echo "|--:|--:|--:|--:|"
    for t in 1 2; do
      [ -n "${cpu_stat[direct/$t]:-}" ] || continue
      printf '| %s |' "$t"
      for c in direct serialize multiplex; do
        case ${cpu_stat[$c/$t]:-} in
          ok) if [ "$c" = direct ] || [ -z "${cpu_add[$c/$t]}" ]; then printf ' %s ns |' "${cpu_ns[$c/$t]}"
              else printf ' %s ns (%+.1f ns) |' "${cpu_ns[$c/$t]}" "${cpu_add[$c/$t]}"; fi ;;
          unavailable*) printf ' unavailable |' ;;
          "") printf ' |' ;;
          *) printf ' %s |' "${cpu_stat[$c/$t]}" ;;
        esac
      done
      echo
    done
  fi

  if [ -f "$dir/null-overhead.csv" ]; then
    echo
    echo "By function, from \`tests/bench/null-overhead\` (one thread, one process: the null backend"
    echo "called directly and through p11mux; CPU ns per call, median of the rounds, and the median"
    echo "of the per-round differences to direct):"
    echo
    echo "| call | null direct | ${title[serialize]} | ${title[multiplex]} |"
    echo "|---|--:|--:|--:|"
    local op config rounds m add last=""
    while IFS=, read -r op config rounds m add; do
      [ "$op" != op ] || continue
      if [ "$op" != "$last" ]; then
        [ -z "$last" ] || echo
        printf '| %s |' "$op"
        last=$op
      fi
      if [ -z "$add" ]; then printf ' %s ns |' "$m"; else printf ' %s ns (%+.1f) |' "$m" "$add"; fi
    done <"$dir/null-overhead.csv"
    [ -z "$last" ] || echo
  fi

  if [ ${#instr[@]} -gt 0 ]; then
    echo
    echo "## Instructions per call (callgrind)"
    echo
    echo "\`tests/bench/callgrind_overhead.sh\`: two run lengths, so start-up cancels; deterministic."
    echo
    echo "| call | backend | direct | ${title[serialize]} | ${title[multiplex]} | ${title[p11kit]} |"
    echo "|---|---|--:|--:|--:|--:|"
    for call in random session-info open-close; do
      for backend in softhsm mock; do
        [ -n "${cgstat[$backend/direct/$call]:-}" ] || continue
        local name=${call/random/C_GenerateRandom}
        name=${name/session-info/C_GetSessionInfo}
        name=${name/open-close/C_OpenSession + C_CloseSession}
        printf '| %s | %s |' "$name" "${backend/softhsm/SoftHSM2}"
        for c in "${configs[@]}"; do
          local k="$backend/$c/$call"
          case ${cgstat[$k]:-} in
            "") printf ' |' ;;
            ok) if [ "$c" = direct ]; then printf ' %s |' "$(int "${instr[$k]}")"
                else printf ' %s (%s) |' "$(int "${instr[$k]}")" "$(printf '%+d' "${added[$k]}" | thousands)"; fi ;;
            *) printf ' unavailable |' ;;
          esac
        done
        echo
      done
    done
  fi

  if has open/mock/direct/open-close/per-thread/1; then
    echo
    echo "## Session open+close against a backend with 1 ms C_OpenSession"
    echo
    echo "The mock with \`MOCK_OPEN_SESSION_US=1000\` (a network HSM), \`--op open-close\`: ops/s (ratio to direct)."
    echo
    echo "| threads | mock direct | ${title[serialize]} | ${title[multiplex]} |"
    echo "|--:|--:|--:|--:|"
    for t in 1 8; do
      has "open/mock/direct/open-close/per-thread/$t" || continue
      printf '| %s |' "$t"
      for c in direct serialize multiplex; do printf ' %s |' "$(cell "open/mock/$c/open-close/per-thread/$t")"; done
      echo
    done
  fi

  if has shared/softhsm/direct/sign-ec/shared/8; then
    echo
    echo "## One session shared by all threads (SoftHSM2)"
    echo
    echo "\`--sessions shared\`: every thread uses the same session, which the PKCS#11 spec does not allow"
    echo "and real applications do anyway. ops/s (ratio to SoftHSM2 directly with one session per"
    echo "thread, run alongside); SoftHSM2 and p11-kit-proxy are run in a subprocess and their crash"
    echo "is recorded."
    echo
    echo "| op | threads | ${title[direct]}, session per thread | ${title[direct]} | ${title[serialize]} | ${title[multiplex]} | ${title[p11kit]} |"
    echo "|---|--:|--:|--:|--:|--:|--:|"
    for op in sign-ec digest; do
      for t in 8 64; do
        has "shared/softhsm/direct/$op/shared/$t" || continue
        printf '| %s | %s |' "$op" "$t"
        for c in per-thread-direct "${configs[@]}"; do printf ' %s |' "$(cell "shared/softhsm/$c/$op/shared/$t")"; done
        echo
      done
    done
  fi

  echo
  targets
}

# unavailable_reason CONFIG: why CONFIG was unavailable in every case that
# tried it; nothing if it ran somewhere (or nowhere).
unavailable_reason() {
  local k why=""
  local -a states=()
  for k in "${!stat[@]}"; do [[ $k != */"$1"/* ]] || states+=("${stat[$k]}"); done
  for k in "${!cpu_stat[@]}"; do [[ $k != "$1"/* ]] || states+=("${cpu_stat[$k]}"); done
  for k in "${!cgstat[@]}"; do [[ $k != */"$1"/* ]] || states+=("${cgstat[$k]}"); done
  for k in "${states[@]}"; do
    [[ $k == unavailable* ]] || return 0
    why=${k#unavailable: }
  done
  echo "$why"
}

# ---- the targets of issue 5 ----
# Each row: target, configuration, measured, verdict.
targets() {
  echo "## Targets (issue 5; information, not assertions)"
  echo
  local c op t k misses measured
  # A mode that could not start has no figures: one line instead of its rows.
  local -a modes=()
  for c in serialize multiplex; do
    local why
    why=$(unavailable_reason "$c")
    if [ -n "$why" ]; then echo "p11mux $c: not measured, unavailable (\`$why\`)."; echo; else modes+=("$c"); fi
  done
  echo "| target | configuration | measured | |"
  echo "|---|---|---|---|"
  for c in "${modes[@]}"; do
    for op in random digest; do
      has "matrix/softhsm/$c/$op/per-thread/1" || continue
      if [[ ${stat[matrix/softhsm/$c/$op/per-thread/1]} == unavailable* ]]; then
        echo "| $op, session per thread: >= 0.95x direct | $c | unavailable | |"; continue
      fi
      misses=0 measured=""
      for t in "${matrix_threads[@]}"; do
        k="matrix/softhsm/$c/$op/per-thread/$t"
        local r=${ratio[$k]:-}
        measured+="${measured:+, }$(x "$r") @$t"
        [ -n "$r" ] && ge "$r" 0.95 || misses=$((misses + 1))
      done
      echo "| $op, session per thread: >= 0.95x direct | $c | $measured | $(verdict $misses) |"
    done
  done
  for c in "${modes[@]}"; do
    [ -n "${cpu_stat[$c/1]:-}" ] || continue
    local add=${cpu_add[$c/1]:-}
    if [ "${cpu_stat[$c/1]}" = ok ] && [ -n "$add" ]; then
      echo "| added CPU time per call over the null backend, 1 thread: <= 50 ns | $c | $(printf '%+.1f' "$add") ns | $(meets ge 50 "$add") |"
    else
      echo "| added CPU time per call over the null backend, 1 thread: <= 50 ns | $c | ${cpu_stat[$c/1]} | |"
    fi
  done
  for c in "${modes[@]}"; do
    for call in random session-info; do
      k="mock/$c/$call"
      [ -n "${cgstat[$k]:-}" ] || continue
      if [ "${cgstat[$k]}" = ok ]; then
        echo "| added instructions per call ($call, null backend): <= 100 | $c | ${added[$k]} | $(meets [ "${added[$k]}" -le 100 ]) |"
      else
        echo "| added instructions per call ($call, null backend): <= 100 | $c | unavailable | |"
      fi
    done
  done
  for c in "${modes[@]}"; do
    has "matrix/softhsm/$c/open-close/per-thread/1" || continue
    if [[ ${stat[matrix/softhsm/$c/open-close/per-thread/1]} == unavailable* ]]; then
      echo "| open+close: >= 1.0x direct SoftHSM2 | $c | unavailable | |"; continue
    fi
    misses=0 measured=""
    for t in "${matrix_threads[@]}"; do
      local r=${ratio[matrix/softhsm/$c/open-close/per-thread/$t]:-}
      measured+="${measured:+, }$(x "$r") @$t"
      [ -n "$r" ] && ge "$r" 1.0 || misses=$((misses + 1))
    done
    echo "| open+close: >= 1.0x direct SoftHSM2 | $c | $measured | $(verdict $misses) |"
  done
  for c in "${modes[@]}"; do
    has "open/mock/$c/open-close/per-thread/1" || continue
    if [[ ${stat[open/mock/$c/open-close/per-thread/1]} == unavailable* ]]; then
      echo "| open+close, 1 ms backend: >= 20x direct | $c | unavailable | |"; continue
    fi
    misses=0 measured=""
    for t in 1 8; do
      local r=${ratio[open/mock/$c/open-close/per-thread/$t]:-}
      has "open/mock/$c/open-close/per-thread/$t" || continue
      measured+="${measured:+, }$(x "$r") @$t"
      [ -n "$r" ] && ge "$r" 20 || misses=$((misses + 1))
    done
    echo "| open+close, 1 ms backend: >= 20x direct | $c | $measured | $(verdict $misses) |"
  done
  for c in multiplex serialize; do
    [[ " ${modes[*]} " == *" $c "* ]] || continue
    k="shared/softhsm/$c/sign-ec/shared/8"
    has "$k" || continue
    local what="shared session, 8 threads, sign-ec: >= 0.95x direct per-thread, 0 errors"
    [ "$c" = multiplex ] || what="$what (target is for multiplex)"
    if [ "${stat[$k]}" = ok ] && [ -n "${ratio[$k]}" ]; then
      echo "| $what | $c | $(x "${ratio[$k]}"), ${errs[$k]} errors | $(if ge "${ratio[$k]}" 0.95 && [ "${errs[$k]}" = 0 ]; then echo pass; else echo "**miss**"; fi) |"
    elif [ "${stat[$k]}" = ok ]; then
      echo "| $what | $c | $(int "${med[$k]}") ops/s, no per-thread figure to compare | |"
    else
      echo "| $what | $c | $(cell "$k") | **miss** |"
    fi
  done
  for c in direct "${modes[@]}" p11kit; do
    has "matrix/softhsm/$c/random/per-thread/2" || has "matrix/softhsm/$c/digest/per-thread/2" || continue
    misses=0 measured=""
    for op in "${matrix_ops[@]}"; do
      local k2="matrix/softhsm/$c/$op/per-thread/2" k64="matrix/softhsm/$c/$op/per-thread/64"
      if [ "${stat[$k2]:-}" != ok ] || [ "${stat[$k64]:-}" != ok ]; then continue; fi
      local q
      q=$(div "${med[$k64]}" "${med[$k2]}")
      measured+="${measured:+, }$op ${q}x"
      ge "$q" 0.8 || misses=$((misses + 1))
    done
    [ -n "$measured" ] || { echo "| 64 threads >= 0.8x 2 threads | $c | unavailable | |"; continue; }
    echo "| 64 threads >= 0.8x 2 threads | $c | $measured | $(verdict $misses) |"
  done
}

report >"$dir/results.md"

# ---- chart: throughput vs threads, one panel per op ----
# plot_data FILE SECTION OP SESSIONS THREADS...: writes the data file and sets
# $series to the gnuplot plot arguments of the configurations that have data.
plot_data() {
  local file=$1 section=$2 op=$3 sessions=$4
  shift 4
  local -a cols=()
  local t c i k
  {
    echo "# threads ${configs[*]}"
    for t in "$@"; do
      printf '%s' "$t"
      for i in "${!configs[@]}"; do
        k="$section/softhsm/${configs[$i]}/$op/$sessions/$t"
        if [ "${stat[$k]:-}" = ok ]; then
          printf ' %s' "${med[$k]}"
          [[ " ${cols[*]} " == *" $i "* ]] || cols+=("$i")
        else
          printf ' ?'
        fi
      done
      echo
    done
  } >"$file"
  series=""
  for i in "${!configs[@]}"; do
    [[ " ${cols[*]} " == *" $i "* ]] || continue
    c=${configs[$i]}
    series+="${series:+, }'$file' using 1:(\$$((i + 2)) / 1000) with linespoints ls $((i + 1)) title '${title[$c]}'"
  done
}

chart() {
  [ ${#matrix_ops[@]} -gt 0 ] || return 0
  command -v gnuplot >/dev/null || { echo "report.sh: gnuplot not installed: no chart" >&2; return 0; }
  local data series
  data=$(mktemp -d)
  local -a plots=()
  for op in "${matrix_ops[@]}"; do
    plot_data "$data/$op.dat" matrix "$op" per-thread "${matrix_threads[@]}"
    [ -z "$series" ] || plots+=("set title '${op_title[$op]:-$op}, one session per thread'" "plot $series")
  done
  if has shared/softhsm/serialize/sign-ec/shared/8; then
    plot_data "$data/shared.dat" shared sign-ec shared 8 64
    local crashed="" c k
    for c in "${configs[@]}"; do
      [[ ${stat[shared/softhsm/$c/sign-ec/shared/8]:-} != crash* ]] || crashed+="${crashed:+, }${title[$c]}"
    done
    # For reference: SoftHSM2 directly, but with a session per thread.
    local ref="$data/shared-ref.dat" t
    for t in 8 64; do
      k="shared/softhsm/per-thread-direct/sign-ec/shared/$t"
      [ "${stat[$k]:-}" != ok ] || echo "$t ${med[$k]}" >>"$ref"
    done
    [ ! -s "$ref" ] || series+="${series:+, }'$ref' using 1:(\$2 / 1000) with linespoints ls 1 dt 2 title '${title[direct]}, session per thread'"
    [ -z "$series" ] ||
      plots+=("set title \"sign-ec, ONE session shared by all threads${crashed:+\\n(crashed: $crashed)}\"" "plot $series")
  fi
  local n=$((${#plots[@]} / 2))
  local ncols=3 rows=$(((n + 2) / 3))
  {
    echo "set terminal pngcairo noenhanced size 1500,$((rows * 470)) font 'sans,10'"
    echo "set output '$dir/throughput.png'"
    echo "set datafile missing '?'"
    echo "set key below maxrows 2 Left reverse samplen 2 width 1"
    echo "set logscale x 2"
    echo "set xtics (1, 2, 8, 64)"
    echo "set xrange [0.8:80]"
    echo "set yrange [0:*]"
    echo "set format y '%g'"
    echo "set grid ytics"
    echo "set xlabel 'threads' offset 0,0.5"
    echo "set ylabel 'thousand ops/s'"
    echo "set style line 1 lc rgb '#555555' lw 2 pt 7"
    echo "set style line 2 lc rgb '#1f77b4' lw 2 pt 5"
    echo "set style line 3 lc rgb '#2ca02c' lw 2 pt 9"
    echo "set style line 4 lc rgb '#d62728' lw 2 pt 13"
    echo "set multiplot layout $rows,$ncols title 'p11mux-load over SoftHSM2 (median of ${runs:-?} runs, ${cpu:-?}, load ${load_start%% *})'"
    printf '%s\n' "${plots[@]}"
    echo "unset multiplot"
  } >"$data/plot.gp"
  gnuplot "$data/plot.gp" 2>"$data/gnuplot.err" || { cat "$data/gnuplot.err" >&2; rm -rf "$data"; return 1; }
  rm -rf "$data"
}
chart

sed -n '/^## Targets/,$p' "$dir/results.md"
echo
echo "report: wrote $dir/results.md$([ ! -f "$dir/throughput.png" ] || echo " and throughput.png")"
