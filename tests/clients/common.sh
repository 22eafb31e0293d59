# Shared steps of the client tests (tests/clients/README.md). Source it, then:
#   require_tools TOOL...      skip (77) when a tool is missing; fail under CI=true
#   client_steps() { ...; }    the client's steps, run once per mode with:
#       $MODE    direct | serialize | multiplex, or a session mode and a
#                [pool] bind joined by '-' (serialize-state, multiplex-open):
#                a test adds those to MODES
#       $MODULE  the PKCS#11 module to load (SoftHSM2, or libp11mux.so)
#       $CASE    a fresh directory for this mode's files
#       $LABEL $PIN $SO_PIN   a fresh SoftHSM2 token (SOFTHSM2_CONF points to it)
#       and, through p11mux, P11MUX_CONFIG naming $CASE/p11mux.conf
#   normalize() { sed ...; }   optional: removes what legitimately differs
#   compare_modes              runs client_steps in the three modes, compares
#
# Environment from CMake: P11MUX_TEST_LIBRARY (libp11mux.so) and
# P11MUX_TEST_SOFTHSM2_MODULE (the SoftHSM2 module).
set -u

readonly LABEL=p11mux-client SO_PIN=12345678 PIN=123456
readonly SOFTHSM2_MODULE=${P11MUX_TEST_SOFTHSM2_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
readonly P11MUX_LIBRARY=${P11MUX_TEST_LIBRARY:?P11MUX_TEST_LIBRARY names libp11mux.so}
MODES=(direct serialize multiplex)

# The steps see only the configuration they write: a developer's own P11MUX_*
# settings would override the test's file. The test suite's P11MUX_TEST_* stay.
while IFS= read -r name; do
  [[ $name == P11MUX_TEST_* ]] || unset "$name"
done < <(compgen -e P11MUX_)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/p11mux-client.XXXXXX") || exit 1
# Every process a mode's steps start in the background (`started PID`) is
# stopped when those steps end, however they end: compare_modes runs them in a
# subshell with its own EXIT trap.
STARTED=()
started() { STARTED+=("$1"); }
stop_started() {
  local pid
  for pid in "${STARTED[@]}"; do
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
  STARTED=()
}
trap 'stop_started; rm -rf "$WORK"' EXIT

require_tools() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null && continue
    if [[ -n ${CI:-} ]]; then
      echo "FAIL: $tool not found (scripts/setup.sh installs it)"
      exit 1
    fi
    echo "SKIP: $tool not found (scripts/setup.sh installs it)"
    exit 77
  done
}

# step TEXT COMMAND...: runs COMMAND, bounded in time and without a terminal to
# ask on, and prints TEXT, its output and its exit code. A step that fails
# counts in STEP_FAILURES, which client_steps returns as its own failure.
STEP_FAILURES=0
step() {
  local text=$1 rc
  shift
  echo "== $text"
  timeout -k 5 30 "$@" </dev/null 2>&1
  rc=$?
  echo "-> exit $rc"
  ((rc == 0)) || ((++STEP_FAILURES))
}

# free_port: a TCP port on 127.0.0.1 that nothing listens on now.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# prepare_case MODE: a fresh token and, through p11mux, a configuration file.
prepare_case() {
  MODE=$1
  CASE=$WORK/$MODE
  mkdir -p "$CASE/tokens"
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
    "$CASE/tokens" >"$CASE/softhsm2.conf"
  export SOFTHSM2_CONF=$CASE/softhsm2.conf
  if ! softhsm2-util --init-token --free --label "$LABEL" --so-pin "$SO_PIN" --pin "$PIN" \
    >"$CASE/init.log" 2>&1; then
    echo "FAIL: softhsm2-util --init-token ($MODE):"
    cat "$CASE/init.log"
    exit 1
  fi
  if [[ $MODE == direct ]]; then
    MODULE=$SOFTHSM2_MODULE
    unset P11MUX_CONFIG
  else
    MODULE=$P11MUX_LIBRARY
    local bind=auto
    [[ $MODE == *-* ]] && bind=${MODE#*-}
    printf 'module = %s\nsession_mode = %s\n[pool]\nbind = %s\n[log]\nlevel = warn\nfile = %s\n' \
      "$SOFTHSM2_MODULE" "${MODE%-*}" "$bind" "$CASE/p11mux.log" >"$CASE/p11mux.conf"
    export P11MUX_CONFIG=$CASE/p11mux.conf
  fi
}

# The default normalization: nothing. A test overrides it.
if ! declare -F normalize >/dev/null; then
  normalize() { cat; }
fi

# compare_modes: client_steps in every mode; passes when each mode's exit code
# and normalized output equal the direct run's.
compare_modes() {
  local mode rc failed=0
  for mode in "${MODES[@]}"; do
    prepare_case "$mode"
    (trap stop_started EXIT; client_steps) >"$WORK/$mode.raw" 2>&1
    rc=$?
    echo "exit $rc" >>"$WORK/$mode.raw"
    normalize <"$WORK/$mode.raw" >"$WORK/$mode.out"
  done
  echo "== direct (SoftHSM2):"
  cat "$WORK/direct.out"
  for mode in "${MODES[@]:1}"; do
    if ! diff -u "$WORK/direct.out" "$WORK/$mode.out" >"$WORK/$mode.diff"; then
      echo "FAIL: through p11mux ($mode) differs from SoftHSM2 directly:"
      cat "$WORK/$mode.diff"
      [[ -s $WORK/$mode/p11mux.log ]] && { echo "-- p11mux log:"; tail -50 "$WORK/$mode/p11mux.log"; }
      failed=1
    fi
  done
  if grep -q '^exit [^0]' "$WORK/direct.out" && [[ ${EXPECT_DIRECT_FAILURE:-0} != 1 ]]; then
    echo "FAIL: the direct run itself failed"
    failed=1
  fi
  [[ $failed == 0 ]] && echo "PASS: ${MODES[*]:1} match SoftHSM2 directly"
  # What a mode's steps wrote to $WORK/$MODE.info: figures that vary from run
  # to run (timings, interleavings), shown but not compared.
  if compgen -G "$WORK/*.info" >/dev/null; then
    echo "-- not compared (varies from run to run):"
    for mode in "${MODES[@]}"; do
      sed "s/^/$mode: /" "$WORK/$mode.info" 2>/dev/null
    done
  fi
  return $failed
}
