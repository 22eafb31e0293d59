# OpenSC's pkcs11-tool through p11mux with a [policy] (README, "Policy"):
# --list-mechanisms shows SoftHSM2's list less exactly the denied mechanisms,
# in both session modes; signing with a denied mechanism is refused while an
# allowed one works; a misspelled mechanism name stops p11mux with a message
# naming it. With `tokens`, --list-slots shows exactly the allowed token's
# slot of SoftHSM2's list; with `objects`, --list-objects shows exactly the
# allowed key's objects of SoftHSM2's list, and the other key cannot sign:
# each compared with SoftHSM2 called directly in the same run.
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

# blocks START_REGEX KEEP_REGEX: the blocks of pkcs11-tool's listing (a line
# matching START_REGEX and the indented lines after it) that have a line
# matching KEEP_REGEX; "Slot N" loses its index (the list is renumbered).
blocks() {
  awk -v start="$1" -v keep="$2" '
    function flush() { if (block != "" && found) printf "%s", block; block = ""; found = 0 }
    $0 ~ start { flush() }
    /^Available slots:/ { next }
    { block = block $0 "\n"; if ($0 ~ keep) found = 1 }
    END { flush() }' | sed -E 's/^Slot [0-9]+ /Slot /'
}

# prepare_case again, on a fresh token directory.
fresh_case() {
  rm -rf "${WORK:?}/$1"
  prepare_case "$1"
}

# tokens: a second token beside the test's; through p11mux only one is seen.
fresh_case direct
softhsm2-util --init-token --free --label other-token --so-pin "$SO_PIN" --pin "$PIN" \
  >"$CASE/init2.log" 2>&1 || fail "softhsm2-util --init-token other-token: $(cat "$CASE/init2.log")"
tokens_conf=$CASE/softhsm2.conf
slots_direct=$(timeout 30 pkcs11-tool --module "$SOFTHSM2_MODULE" --list-slots 2>&1) ||
  fail "pkcs11-tool --list-slots on SoftHSM2 directly: $slots_direct"
grep -q 'token label *: other-token' <<<"$slots_direct" || fail "SoftHSM2 lists no other-token"
other_serial=$(blocks '^Slot ' 'token label *: other-token$' <<<"$slots_direct" |
  sed -nE 's/^ +serial num *: *//p')
[[ -n $other_serial ]] || fail "no serial number for other-token: $slots_direct"
# SOFTHSM2_CONF names the direct case's tokens from here on: the same tokens
# directly and through p11mux.
for mode in serialize multiplex; do
  fresh_case "$mode"
  export SOFTHSM2_CONF=$tokens_conf
  for rule in "$LABEL" "serial:$other_serial"; do
    printf '[policy]\ntokens = %s\n' "$rule" >"$CASE/policy.conf"
    cat "$CASE/p11mux.conf" "$CASE/policy.conf" >"$CASE/tokens.conf"
    keep=$([[ $rule == serial:* ]] && echo "serial num *: $other_serial\$" || echo "token label *: $LABEL\$")
    expected=$(blocks '^Slot ' "$keep" <<<"$slots_direct")
    through=$(P11MUX_CONFIG=$CASE/tokens.conf timeout 30 pkcs11-tool --module "$MODULE" \
      --list-slots 2>&1) || fail "$mode: tokens = $rule: --list-slots: $through"
    through=$(blocks '^Slot ' '.' <<<"$through")
    [[ $(grep -c '^Slot ' <<<"$through") == 1 ]] || fail "$mode: tokens = $rule: not one slot: $through"
    if ! diff -u <(echo "$expected") <(echo "$through") >"$CASE/diff"; then
      fail "$mode: tokens = $rule: not SoftHSM2's slot of that token:"
      cat "$CASE/diff"
    fi
  done
  # The hidden token cannot be reached by its label either.
  if out=$(P11MUX_CONFIG=$CASE/tokens.conf timeout 30 pkcs11-tool --module "$MODULE" \
    --token-label "$LABEL" --list-objects 2>&1); then
    fail "$mode: tokens = serial:$other_serial: $LABEL still reachable: $out"
  fi
done

# objects: two key pairs; through p11mux only tls-key's two objects exist.
fresh_case direct
objects_conf=$CASE/softhsm2.conf
direct_tool=(pkcs11-tool --module "$SOFTHSM2_MODULE" --token-label "$LABEL" --login --pin "$PIN")
for key in tls-key:01 db-key:02; do
  timeout 30 "${direct_tool[@]}" --keypairgen --key-type EC:prime256v1 --label "${key%:*}" \
    --id "${key#*:}" >"$CASE/keygen.log" 2>&1 || fail "--keypairgen ${key%:*}: $(cat "$CASE/keygen.log")"
done
objects_direct=$(timeout 30 "${direct_tool[@]}" --list-objects 2>&1) ||
  fail "pkcs11-tool --list-objects on SoftHSM2 directly: $objects_direct"
[[ $(grep -c '^ *label: *db-key$' <<<"$objects_direct") == 2 ]] ||
  fail "SoftHSM2 does not list db-key's two objects: $objects_direct"
expected=$(blocks '^[A-Z]' '^ *label: *tls-key$' <<<"$objects_direct")
[[ $(grep -c '^[A-Z]' <<<"$expected") == 2 ]] || fail "SoftHSM2 does not list tls-key's two objects"
data=$CASE/data
head -c 32 /dev/urandom >"$data"
for mode in serialize multiplex; do
  fresh_case "$mode"
  export SOFTHSM2_CONF=$objects_conf
  printf '[policy]\nobjects = label:tls-key\n' >>"$CASE/p11mux.conf"
  tool=(pkcs11-tool --module "$MODULE" --token-label "$LABEL" --login --pin "$PIN")
  through=$(timeout 30 "${tool[@]}" --list-objects 2>&1) || fail "$mode: --list-objects: $through"
  if ! diff -u <(echo "$expected") <(blocks '^[A-Z]' '.' <<<"$through") >"$CASE/diff"; then
    fail "$mode: objects = label:tls-key: not SoftHSM2's tls-key objects:"
    cat "$CASE/diff"
  fi
  timeout 30 "${tool[@]}" --sign --id 01 -m ECDSA --input-file "$data" \
    --output-file "$CASE/sig" >"$CASE/allowed.log" 2>&1 ||
    fail "$mode: a signature with tls-key failed: $(cat "$CASE/allowed.log")"
  if timeout 30 "${tool[@]}" --sign --id 02 -m ECDSA --input-file "$data" \
    --output-file "$CASE/sig" >"$CASE/hidden.log" 2>&1; then
    fail "$mode: a signature with the hidden db-key succeeded"
  fi
done

((failed == 0)) && echo "PASS: the policy's mechanisms, tokens and objects are hidden and refused through pkcs11-tool"
exit $failed
