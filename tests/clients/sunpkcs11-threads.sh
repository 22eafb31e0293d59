#!/usr/bin/env bash
# Java 17 SunPKCS11 with 32 signing threads: SunPkcs11Threads.java says what
# it does. SunPKCS11 keeps its own pool of sessions and signs on several at
# once, so this is parallel calls on separate sessions: p11mux's pool in
# serialize mode, and in multiplex mode sessions that more than one thread
# uses over time. Every mode must sign and verify every attempt, so the three
# outputs are compared as they are; timings are printed after, not compared.
#
# The program is compiled once with javac: 1.9 s, where the source launcher
# (`java File.java`) costs 3.3 s more on each of the three runs (measured).
source "$(dirname "$0")/common.sh"

require_tools java javac
readonly SOURCE=$(dirname "$0")/SunPkcs11Threads.java
if ! timeout -k 5 60 javac -d "$WORK/classes" "$SOURCE" >"$WORK/javac.log" 2>&1; then
  echo "FAIL: javac $SOURCE:"
  cat "$WORK/javac.log"
  exit 1
fi

client_steps() {
  # The SunPKCS11 configuration: the token is the first slot that has one
  # (softhsm2-util --init-token --free gives it the first slot).
  printf 'name = p11mux-test\nlibrary = %s\nslotListIndex = 0\n' "$MODULE" >"$CASE/sunpkcs11.cfg"
  timeout -k 5 45 java -cp "$WORK/classes" SunPkcs11Threads "$CASE/sunpkcs11.cfg" "$PIN" \
    32 20 20 "$WORK/$MODE.info"
}

compare_modes
