#!/usr/bin/env bash
# PyKCS11 (Debian's python3-pykcs11, with the system Python) with 16 threads on
# one session: pykcs11_threads.py says what it does.
#
# What is compared. Threads sharing one session are not the same thing in
# every mode, by design (README "Session modes"): SoftHSM2 directly and p11mux
# serialize keep one operation per session, so a thread's C_SignInit while
# another's signature is in progress gets CKR_OPERATION_ACTIVE; p11mux
# multiplex keeps operation state per thread, so every thread signs. The script
# is told which of the two each mode promises (--expect) and prints the same
# lines when the mode keeps its promise, so the three outputs are compared as
# usual: a different line in any mode is a failure. Counts that vary from run
# to run (how many CKR_OPERATION_ACTIVE) and timings are printed after the
# comparison, not compared.
#
# PyKCS11 keeps the GIL across each call, so its calls interleave but never
# overlap, and SoftHSM2 used directly does not crash here: it answers as the
# spec says. Calls that overlap on one session (a C client; SoftHSM2 crashes)
# are tests/integration's integration-shared-session-p11mux.
source "$(dirname "$0")/common.sh"

readonly PYTHON=/usr/bin/python3 # the system Python, where python3-pykcs11 is
require_tools "$PYTHON"
if ! "$PYTHON" -c 'import PyKCS11' 2>/dev/null; then
  if [[ -n ${CI:-} ]]; then
    echo "FAIL: PyKCS11 not found for $PYTHON (scripts/setup.sh installs python3-pykcs11)"
    exit 1
  fi
  echo "SKIP: PyKCS11 not found for $PYTHON (scripts/setup.sh installs python3-pykcs11)"
  exit 77
fi
readonly SCRIPT=$(dirname "$0")/pykcs11_threads.py

client_steps() {
  local expect=one-operation
  [[ $MODE == multiplex ]] && expect=per-thread
  timeout -k 5 40 "$PYTHON" "$SCRIPT" --module "$MODULE" --label "$LABEL" --pin "$PIN" \
    --threads 16 --count 40 --seconds 10 --expect "$expect" --info "$WORK/$MODE.info"
}

compare_modes
