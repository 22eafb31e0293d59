#!/usr/bin/env bash
# pkcs11-tool --test through MODULE_UNDER_TEST must behave exactly like SoftHSM2 itself.
#
# Usage: pkcs11_tool_test.sh MODULE_UNDER_TEST
#
# Runs the same sequence twice, each on a freshly initialized SoftHSM2 token in its
# own temp directory (own SOFTHSM2_CONF): an RSA-2048 key pair generation (so that
# --test exercises signatures and decryption) and `pkcs11-tool --login --test`.
# First with --module SoftHSM2 (the reference), then with --module MODULE_UNDER_TEST
# with P11MUX_MODULE naming SoftHSM2. Passes when exit codes are equal and outputs
# are equal after normalizing volatile parts (hex dumps, slot and session numbers,
# serial numbers). Equal, not successful: pkcs11-tool --test exits 1 on SoftHSM2
# 2.6.1 itself, because of an RSA-OAEP case SoftHSM2 refuses.
#
# Environment: P11MUX_TEST_SOFTHSM2_MODULE (default /usr/lib/softhsm/libsofthsm2.so),
# P11MUX_MODULE (default: the SoftHSM2 module). Exit 0 pass, 1 fail, 2 usage,
# 77 skipped (tools missing).
set -u

if [[ $# -ne 1 ]]; then
  echo "usage: $0 MODULE_UNDER_TEST" >&2
  exit 2
fi
readonly under_test=$1
readonly softhsm=${P11MUX_TEST_SOFTHSM2_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
export P11MUX_MODULE=${P11MUX_MODULE:-$softhsm}
readonly label=p11mux-test so_pin=12345678 pin=123456

for tool in pkcs11-tool softhsm2-util timeout; do
  if ! command -v "$tool" >/dev/null; then
    echo "SKIP: $tool not found"
    exit 77
  fi
done
for module in "$softhsm" "$under_test"; do
  if [[ ! -r $module ]]; then
    echo "FAIL: module $module not found"
    exit 1
  fi
done

work=$(mktemp -d "${TMPDIR:-/tmp}/p11mux-pkcs11-tool.XXXXXX") || exit 1
trap 'rm -rf "$work"' EXIT

# run_case NAME MODULE: fresh token, key pair, --test. Leaves NAME/{keygen,test}.{out,err,rc}.
run_case() {
  local dir=$work/$1 module=$2
  mkdir -p "$dir/tokens"
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
    "$dir/tokens" >"$dir/softhsm2.conf"
  export SOFTHSM2_CONF=$dir/softhsm2.conf
  if ! softhsm2-util --init-token --free --label "$label" --so-pin "$so_pin" --pin "$pin" \
    >"$dir/init.log" 2>&1; then
    echo "FAIL: softhsm2-util --init-token for $1:"
    cat "$dir/init.log"
    exit 1
  fi
  local tool=(timeout 30 pkcs11-tool --module "$module" --token-label "$label" --login --pin "$pin")
  "${tool[@]}" --keypairgen --key-type rsa:2048 --id 01 --label p11mux-rsa \
    >"$dir/keygen.out" 2>"$dir/keygen.err"
  echo $? >"$dir/keygen.rc"
  "${tool[@]}" --test >"$dir/test.out" 2>"$dir/test.err"
  echo $? >"$dir/test.rc"
  unset SOFTHSM2_CONF
}

# Replaces what legitimately differs between two runs.
normalize() {
  sed -E \
    -e 's/[0-9a-fA-F]{16,}/<hex>/g' \
    -e 's/([0-9a-fA-F]{2}[ :]){8,}[0-9a-fA-F]{2}/<hex>/g' \
    -e 's/([Ss]lot( ID)?:? *)(0x)?[0-9a-fA-F]+/\1<slot>/g' \
    -e 's/\(0x[0-9a-fA-F]+\)(: SoftHSM)/(<slot>)\1/g' \
    -e 's/(token )\(0x[0-9a-fA-F]+\)/\1(<slot>)/g' \
    -e 's/([Ss]ession( handle)?:? *)(0x)?[0-9a-fA-F]+/\1<session>/g' \
    -e 's/(serial num *: *).*/\1<serial>/' \
    "$1"
}

show() {
  local name=$1 module=$2 dir=$work/$1
  echo "=== $name: $module"
  for step in keygen test; do
    echo "--- $step: exit $(cat "$dir/$step.rc")"
    echo "[stdout]"
    cat "$dir/$step.out"
    echo "[stderr]"
    cat "$dir/$step.err"
  done
}

run_case reference "$softhsm"
run_case under-test "$under_test"
show reference "$softhsm"
show under-test "$under_test"

status=0
echo "=== comparison"
for step in keygen test; do
  ref_rc=$(cat "$work/reference/$step.rc")
  ut_rc=$(cat "$work/under-test/$step.rc")
  if [[ $ref_rc != "$ut_rc" ]]; then
    echo "FAIL: $step exit code: reference $ref_rc, under test $ut_rc"
    status=1
  else
    echo "ok: $step exit codes equal ($ref_rc)"
  fi
  for stream in out err; do
    for name in reference under-test; do
      if ! normalize "$work/$name/$step.$stream" >"$work/$name/$step.$stream.norm"; then
        echo "FAIL: cannot normalize $name $step std$stream"
        exit 1
      fi
    done
    if diff -u --label "reference $step std$stream" --label "under-test $step std$stream" \
      "$work/reference/$step.$stream.norm" "$work/under-test/$step.$stream.norm"; then
      echo "ok: $step std$stream equal after normalization"
    else
      echo "FAIL: $step std$stream differs (normalized diff above)"
      status=1
    fi
  done
done
# Guard against a comparison of nothing.
if [[ ! -s $work/reference/test.out.norm ]]; then
  echo "FAIL: pkcs11-tool --test printed nothing on the reference"
  status=1
fi
# The key pair must exist, or --test would not exercise signatures.
if [[ $(cat "$work/reference/keygen.rc") != 0 ]]; then
  echo "FAIL: key pair generation failed on the reference"
  status=1
fi
# A timed-out run (124) is never a match, even if both timed out.
if [[ $(cat "$work/reference/test.rc") == 124 || $(cat "$work/under-test/test.rc") == 124 ]]; then
  echo "FAIL: pkcs11-tool --test timed out"
  status=1
fi
if [[ $status == 0 ]]; then echo "PASS"; else echo "FAIL"; fi
exit $status
