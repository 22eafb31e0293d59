# OpenSC's pkcs11-tool through p11mux with a [policy] (README, "Policy"):
# --list-mechanisms shows SoftHSM2's list less exactly the denied mechanisms,
# in both session modes; signing with a denied mechanism is refused while an
# allowed one works; a misspelled mechanism name stops p11mux with a message
# naming it.
source "$(dirname "$0")/common.sh"
require_tools pkcs11-tool softhsm2-util timeout

failed=0
fail() {
  echo "FAIL: $*"
  failed=1
}

# pkcs11-tool prints a mechanism as "  ECDSA, keySize=..., sign, verify".
prepare_case direct
direct=$(timeout 30 pkcs11-tool --module "$MODULE" --token-label "$LABEL" --list-mechanisms 2>&1) ||
  fail "pkcs11-tool --list-mechanisms on SoftHSM2 directly: $direct"
grep -qE '^ +ECDSA,' <<<"$direct" || fail "SoftHSM2 lists no ECDSA: nothing to deny"
grep -qE '^ +RSA-PKCS,' <<<"$direct" || fail "SoftHSM2 lists no RSA-PKCS: nothing to deny"
expected=$(grep -vE '^ +(ECDSA|RSA-PKCS),' <<<"$direct")

for mode in serialize multiplex; do
  prepare_case "$mode"
  printf '[policy]\nmechanisms_deny = CKM_ECDSA, CKM_RSA_PKCS\n' >>"$CASE/p11mux.conf"
  tool=(pkcs11-tool --module "$MODULE" --token-label "$LABEL")
  through=$(timeout 30 "${tool[@]}" --list-mechanisms 2>&1) || fail "$mode: --list-mechanisms: $through"
  if ! diff -u <(echo "$expected") <(echo "$through") >"$CASE/diff"; then
    fail "$mode: not SoftHSM2's list less ECDSA and RSA-PKCS:"
    cat "$CASE/diff"
  fi
  # A key pair, then a signature with a denied and an allowed mechanism.
  login=(--login --pin "$PIN")
  timeout 30 "${tool[@]}" "${login[@]}" --keypairgen --key-type rsa:2048 --id 01 --label pol \
    >"$CASE/keygen.log" 2>&1 || fail "$mode: --keypairgen: $(cat "$CASE/keygen.log")"
  head -c 32 /dev/urandom >"$CASE/data"
  if timeout 30 "${tool[@]}" "${login[@]}" --sign --id 01 -m RSA-PKCS --input-file "$CASE/data" \
    --output-file "$CASE/sig" >"$CASE/denied.log" 2>&1; then
    fail "$mode: a signature with the denied RSA-PKCS succeeded"
  fi
  grep -q CKR_MECHANISM_INVALID "$CASE/denied.log" ||
    fail "$mode: the denied signature did not fail with CKR_MECHANISM_INVALID: $(cat "$CASE/denied.log")"
  grep -q 'policy refused C_SignInit: rule mechanism (CKM_RSA_PKCS)' "$CASE/p11mux.log" ||
    fail "$mode: no warning in p11mux's log: $(cat "$CASE/p11mux.log")"
  timeout 30 "${tool[@]}" "${login[@]}" --sign --id 01 -m SHA256-RSA-PKCS-PSS \
    --input-file "$CASE/data" --output-file "$CASE/sig" >"$CASE/allowed.log" 2>&1 ||
    fail "$mode: a signature with the allowed SHA256-RSA-PKCS-PSS failed: $(cat "$CASE/allowed.log")"
done

# A misspelled name: p11mux does not start, and says which name.
prepare_case serialize
printf '[policy]\nmechanisms_deny = CKM_ECDSA, CKM_RSA_PKSC\n' >>"$CASE/p11mux.conf"
if out=$(timeout 30 pkcs11-tool --module "$MODULE" --list-mechanisms 2>&1); then
  fail "a misspelled mechanism did not stop C_Initialize: $out"
fi
grep -q "unknown mechanism 'CKM_RSA_PKSC'" <<<"$out" || fail "the error does not name CKM_RSA_PKSC: $out"

((failed == 0)) && echo "PASS: the policy's mechanisms are hidden and refused through pkcs11-tool"
exit $failed
