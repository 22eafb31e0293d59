# OpenSSL 3 with the libp11 engine (libengine-pkcs11-openssl), loaded by an
# openssl.cnf as users configure it: a self-signed certificate from the token's
# EC and RSA keys (`req -x509`), and `pkeyutl -sign` with EC, RSA PKCS#1 and
# RSA-PSS. OpenSSL verifies every signature in software with the public key it
# exported from the token. pkcs11-tool makes the keys, through the same module.
source "$(dirname "$0")/common.sh"
source "$(dirname "$0")/tls_config.sh"
require_tools openssl pkcs11-tool softhsm2-util timeout cmp

ENGINES_DIR=$(openssl version -e | sed -E 's/^ENGINESDIR: "(.*)"$/\1/')
if [[ ! -e $ENGINES_DIR/pkcs11.so ]]; then
  [[ -n ${CI:-} ]] && { echo "FAIL: no $ENGINES_DIR/pkcs11.so (libengine-pkcs11-openssl)"; exit 1; }
  echo "SKIP: no $ENGINES_DIR/pkcs11.so (libengine-pkcs11-openssl)"
  exit 77
fi

client_steps() {
  local token="pkcs11:token=$LABEL" key
  {
    openssl_engine_conf "$ENGINES_DIR/pkcs11.so" "$MODULE" 0 "$PIN"
    cat <<EOF

[req]
distinguished_name = req_dn
x509_extensions = req_ext

[req_dn]

[req_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,digitalSignature,keyCertSign
subjectKeyIdentifier = hash
EOF
  } >"$CASE/openssl.cnf"
  export OPENSSL_CONF=$CASE/openssl.cnf
  local engine=(-engine pkcs11 -keyform engine)
  step "engine" openssl engine -t pkcs11

  step "generate EC P-256" pkcs11-tool --module "$MODULE" --token-label "$LABEL" --login \
    --pin "$PIN" --keypairgen --key-type EC:prime256v1 --label eckey --id 01
  step "generate RSA 2048" pkcs11-tool --module "$MODULE" --token-label "$LABEL" --login \
    --pin "$PIN" --keypairgen --key-type rsa:2048 --label rsakey --id 02

  for key in eckey rsakey; do
    step "export the $key public key" openssl pkey -engine pkcs11 -inform engine -pubin \
      -in "$token;object=$key;type=public" -pubout -out "$CASE/$key.pub"
    step "its parameters" openssl pkey -pubin -in "$CASE/$key.pub" -noout -text_pub
    step "self-signed certificate ($key)" openssl req -x509 "${engine[@]}" \
      -key "$token;object=$key;type=private" -sha256 -subj "/O=p11mux/CN=p11mux client test" \
      -days 30 -out "$CASE/$key.crt"
    step "verify it" openssl verify -CAfile "$CASE/$key.crt" "$CASE/$key.crt"
    step "certificate" openssl x509 -in "$CASE/$key.crt" -noout -text
    step "its key is the token's" cmp <(openssl x509 -in "$CASE/$key.crt" -noout -pubkey) \
      "$CASE/$key.pub"
  done

  head -c 1000 /dev/urandom >"$CASE/data"
  openssl dgst -sha256 -binary -out "$CASE/digest" "$CASE/data"
  # Each signature: the key, then the options of both -sign and -verify.
  local -A keys=([ECDSA]=eckey [RSA-PKCS1]=rsakey [RSA-PSS]=rsakey) opts=(
    [ECDSA]=""
    [RSA-PKCS1]="-pkeyopt digest:sha256"
    [RSA-PSS]="-pkeyopt digest:sha256 -pkeyopt rsa_padding_mode:pss -pkeyopt rsa_pss_saltlen:32"
  )
  local alg
  for alg in ECDSA RSA-PKCS1 RSA-PSS; do
    key=${keys[$alg]}
    # shellcheck disable=SC2086 # the options are words
    step "sign $alg" openssl pkeyutl -sign "${engine[@]}" -inkey "$token;object=$key;type=private" \
      ${opts[$alg]} -in "$CASE/digest" -out "$CASE/$alg.sig"
    # shellcheck disable=SC2086
    step "verify $alg in software" openssl pkeyutl -verify -pubin -inkey "$CASE/$key.pub" \
      ${opts[$alg]} -in "$CASE/digest" -sigfile "$CASE/$alg.sig"
  done
  echo "failed steps: $STEP_FAILURES"
  ((STEP_FAILURES == 0))
}

# Differs per run: key bytes (hex dumps), the certificate's serial number,
# validity dates, signatures and key identifiers.
normalize() {
  sed -E -e "s#$WORK/[a-z]+/#CASE/#g" -e '/^\s+[0-9a-fA-F]{2}(:[0-9a-fA-F]{2})*:?$/d' \
    -e 's/^(\s+EC_POINT:\s+)[0-9a-f]+$/\1POINT/' -e 's/^(\s+(Not Before|Not After)\s*:).*/\1 DATE/'
}

compare_modes
