# OpenSC's pkcs11-tool: an RSA-2048 key pair on the token (so that --test
# exercises signatures and decryption), then `pkcs11-tool --login --test`.
# Equal, not successful: --test exits 1 on SoftHSM2 2.6.1 itself, because of an
# RSA-OAEP case SoftHSM2 refuses, so the direct run's failure is expected.
source "$(dirname "$0")/common.sh"
require_tools pkcs11-tool softhsm2-util timeout

EXPECT_DIRECT_FAILURE=1
# The spec's session rules in both bindings of each mode (multiplex's default
# is bind = state, serialize's bind = open).
MODES+=(serialize-state multiplex-open)

client_steps() {
  local tool=(pkcs11-tool --module "$MODULE" --token-label "$LABEL" --login --pin "$PIN")
  step "key pair" "${tool[@]}" --keypairgen --key-type rsa:2048 --id 01 --label p11mux-rsa
  step "test" "${tool[@]}" --test
  ((STEP_FAILURES == 0))
}

# Key bytes, slot and session numbers and the token's serial number differ
# from run to run.
normalize() {
  sed -E \
    -e 's/[0-9a-fA-F]{16,}/<hex>/g' \
    -e 's/([0-9a-fA-F]{2}[ :]){8,}[0-9a-fA-F]{2}/<hex>/g' \
    -e 's/([Ss]lot( ID)?:? *)(0x)?[0-9a-fA-F]+/\1<slot>/g' \
    -e 's/\(0x[0-9a-fA-F]+\)(: SoftHSM)/(<slot>)\1/g' \
    -e 's/(token )\(0x[0-9a-fA-F]+\)/\1(<slot>)/g' \
    -e 's/([Ss]ession( handle)?:? *)(0x)?[0-9a-fA-F]+/\1<session>/g' \
    -e 's/(serial num *: *).*/\1<serial>/'
}

compare_modes
