# GnuTLS through p11-kit: p11tool lists the token, generates an EC and an RSA
# key pair on it and test-signs with them (PKCS#1 and PSS); certtool makes a
# self-signed certificate with each token key and verifies it; p11tool stores
# one on the token. GnuTLS initializes its modules with
# CKF_LIBRARY_CANT_CREATE_OS_THREADS, which p11mux must honour.
source "$(dirname "$0")/common.sh"
require_tools p11tool certtool softhsm2-util timeout

export GNUTLS_PIN=$PIN

client_steps() {
  local token="pkcs11:token=$LABEL" key
  # With a setting that needs a thread (ignored directly), p11mux must log
  # that CKF_LIBRARY_CANT_CREATE_OS_THREADS forbids it: checked below.
  P11MUX_POOL_IDLE_TIMEOUT_S=60 step "list tokens" p11tool --provider "$MODULE" --list-tokens
  step "generate EC P-256" p11tool --provider "$MODULE" --login --generate-privkey ecdsa \
    --curve secp256r1 --label eckey --id 01 --outfile "$CASE/ec.pub" "$token"
  step "generate RSA 2048" p11tool --provider "$MODULE" --login --generate-privkey rsa \
    --bits 2048 --label rsakey --id 02 --outfile "$CASE/rsa.pub" "$token"
  for key in eckey rsakey; do
    step "list $key" p11tool --provider "$MODULE" --login --list-all "$token;object=$key;type=private"
    step "list $key (public)" p11tool --provider "$MODULE" --list-all "$token;object=$key;type=public"
  done
  step "test-sign EC" p11tool --provider "$MODULE" --login --test-sign "$token;object=eckey"
  step "test-sign RSA" p11tool --provider "$MODULE" --login --test-sign "$token;object=rsakey"
  step "test-sign RSA-PSS" p11tool --provider "$MODULE" --login --test-sign \
    --sign-params rsa-pss "$token;object=rsakey"

  cat >"$CASE/template" <<'EOF'
cn = "p11mux client test"
organization = "p11mux"
serial = 1
expiration_days = 30
ca
signing_key
cert_signing_key
EOF
  for key in eckey rsakey; do
    step "self-signed certificate ($key)" certtool --provider "$MODULE" --generate-self-signed \
      --load-privkey "$token;object=$key;type=private" --template "$CASE/template" \
      --outfile "$CASE/$key.pem"
    step "verify it" certtool --verify --load-ca-certificate "$CASE/$key.pem" --infile "$CASE/$key.pem"
    step "certificate" certtool --certificate-info --infile "$CASE/$key.pem"
  done
  step "store the certificate" p11tool --provider "$MODULE" --login --write \
    --load-certificate "$CASE/eckey.pem" --label eccert --id 01 "$token"
  step "list certificates" p11tool --provider "$MODULE" --list-all-certs "$token"
  echo "failed steps: $STEP_FAILURES"
  ((STEP_FAILURES == 0))
}

# Differs per run: the token's serial, key bytes and the identifiers derived
# from them (hex dumps, key ids, pins), signatures and validity dates.
normalize() {
  sed -E -e 's/serial=[0-9a-f]+/serial=SERIAL/g' -e 's/^(\s*Serial: )[0-9a-f]+$/\1SERIAL/' \
    -e '/^\s+[0-9a-f]{2}(:[0-9a-f]{2})*:?$/d' -e '/^\s+[0-9a-f]{40}$/d' \
    -e '/^-----BEGIN/,/^-----END/{/^-----/!d}' \
    -e 's/^(\s+(sha1|sha256|pin-sha256):).*/\1 KEYID/' \
    -e 's/^(\s*(Not Before|Not After|Expires): ).*/\1DATE/'
}

compare_modes || exit 1
for mode in serialize multiplex; do
  if ! grep -q 'CKF_LIBRARY_CANT_CREATE_OS_THREADS' "$WORK/$mode/p11mux.log"; then
    echo "FAIL: ($mode) p11mux did not see CKF_LIBRARY_CANT_CREATE_OS_THREADS from GnuTLS:"
    cat "$WORK/$mode/p11mux.log"
    exit 1
  fi
done
