#!/bin/sh
# End-to-end check of p11mux-load against SoftHSM2 on a throwaway token.
# Usage: softhsm2_smoke_test.sh PATH/TO/p11mux-load PATH/TO/libsofthsm2.so
set -eu
tool=$1
module=$2
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir "$dir/tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$dir/tokens" >"$dir/softhsm2.conf"
export SOFTHSM2_CONF="$dir/softhsm2.conf"
softhsm2-util --init-token --free --label load --so-pin 12345678 --pin 123456 >/dev/null
export P11MUX_LOAD_PIN=123456

fail() {
  echo "FAIL: $*" >&2
  exit 1
}
load() { "$tool" --module "$module" --token-label load --quiet "$@"; }

echo "every op but login-logout, 2 threads, every result verified"
load --op random,digest,sign-ec,verify-ec,sign-rsa,verify-rsa,aes-gcm,open-close,find \
  --threads 2 --count 2000 --verify-all --json >"$dir/out.json" || fail "exit status $?"
grep -q '"ok":true' "$dir/out.json" || fail "not ok: $(cat "$dir/out.json")"
grep -q '"total_ops":2000,' "$dir/out.json" || fail "not 2000 ops: $(cat "$dir/out.json")"
grep -q '"verification_failures":0,' "$dir/out.json" || fail "verification failures"

echo "the keys now exist: --no-create-keys finds them"
load --op sign-ec,sign-rsa,aes-gcm --no-create-keys --count 50 >/dev/null || fail "exit status $?"

echo "login-logout from 2 threads"
load --op login-logout --threads 2 --count 100 >/dev/null || fail "exit status $?"

echo "per-op sessions, paced"
load --op digest,sign-ec --sessions per-op --threads 2 --rate 1000 --count 100 --warmup 0.1 >"$dir/out.txt" ||
  fail "exit status $?"
grep -q "scheduled start" "$dir/out.txt" || fail "no paced-latency note: $(cat "$dir/out.txt")"

echo "bad input: one line, exit status 2"
expect_setup_error() {
  pattern=$1
  shift
  set +e
  "$tool" "$@" --count 1 >/dev/null 2>"$dir/err.txt"
  rc=$?
  set -e
  [ "$rc" -eq 2 ] || fail "$*: exit status $rc, not 2"
  [ "$(wc -l <"$dir/err.txt")" -eq 1 ] || fail "$*: not one line: $(cat "$dir/err.txt")"
  grep -q "^p11mux-load: error: .*$pattern" "$dir/err.txt" || fail "$*: no '$pattern' in $(cat "$dir/err.txt")"
}
expect_setup_error CKR_PIN_INCORRECT --module "$module" --token-label load --pin 000000
expect_setup_error "no token labelled 'nope'" --module "$module" --token-label nope
expect_setup_error "cannot load module" --module "$dir/missing.so"
expect_setup_error "unknown operation 'sign-dsa'" --module "$module" --op sign-dsa
softhsm2-util --init-token --free --label empty --so-pin 12345678 --pin 123456 >/dev/null
expect_setup_error "no EC private key" --module "$module" --token-label empty --op sign-ec --no-create-keys

echo "p11mux-load against SoftHSM2: all checks passed"
