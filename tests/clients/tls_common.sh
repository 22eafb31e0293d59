# shellcheck shell=bash
# Shared steps of the TLS server tests (nginx.sh, stunnel.sh), sourced after
# common.sh: a key on the token, its certificate, the OpenSSL engine's
# configuration, and bounded handshake loops.
source "$(dirname "${BASH_SOURCE[0]}")/tls_config.sh"
readonly PKCS11_ENGINE=${P11MUX_TEST_PKCS11_ENGINE:-/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so}
readonly KEY_LABEL=tls-key
# The key as the libp11 engine names it; the PIN is in the URI because a
# server has nobody to ask.
readonly KEY_URI="pkcs11:token=$LABEL;object=$KEY_LABEL;type=private;pin-value=$PIN"

require_engine() {
  [[ -e $PKCS11_ENGINE ]] && return 0
  if [[ -n ${CI:-} ]]; then
    echo "FAIL: $PKCS11_ENGINE not found (libengine-pkcs11-openssl)"
    exit 1
  fi
  echo "SKIP: $PKCS11_ENGINE not found (libengine-pkcs11-openssl)"
  exit 77
}

# tls_key_and_cert KEYTYPE: a key pair on the token (pkcs11-tool through
# $MODULE; KEYTYPE as pkcs11-tool takes it: EC:prime256v1, rsa:2048), an
# openssl.cnf in $CASE that loads the engine with MODULE_PATH=$MODULE, and a
# self-signed certificate made with the token's key in $CASE/cert.pem. The
# engine is initialized as the configuration loads (init = 1): servers such as
# nginx load keys from an engine without initializing it.
tls_key_and_cert() {
  pkcs11-tool --module "$MODULE" --login --pin "$PIN" --keypairgen --key-type "$1" \
    --label "$KEY_LABEL" --id 01 >"$CASE/keygen.log" 2>&1 ||
    { echo "keygen failed:"; cat "$CASE/keygen.log"; return 1; }
  openssl_engine_conf "$PKCS11_ENGINE" "$MODULE" 1 >"$CASE/openssl.cnf"
  OPENSSL_CONF=$CASE/openssl.cnf openssl req -new -x509 -days 2 -subj /CN=localhost \
    -engine pkcs11 -keyform engine -key "$KEY_URI" -out "$CASE/cert.pem" \
    >"$CASE/req.log" 2>&1 || { echo "certificate failed:"; cat "$CASE/req.log"; return 1; }
  echo "key and certificate on the token"
}

# Paths that differ between the modes: this mode's directory, the module.
normalize_paths() {
  sed -e "s|$WORK/[a-z]*/|CASE/|g" -e "s|$SOFTHSM2_MODULE|MODULE|g" -e "s|$P11MUX_LIBRARY|MODULE|g"
}

# wait_port PORT PID: up to 15 s for something to listen on 127.0.0.1:PORT
# while process PID (the server) lives.
wait_port() {
  local i
  for ((i = 0; i < 150; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# fetch PORT: one full TLS handshake (a new process, no session to resume)
# and a GET of /; prints the page, or nothing. At most 10 s.
fetch() {
  printf 'GET / HTTP/1.0\r\nHost: localhost\r\n\r\n' |
    timeout -k 2 10 openssl s_client -connect "127.0.0.1:$1" -servername localhost \
      -quiet 2>/dev/null | grep -a '^p11mux-page'
}

# handshakes PORT PARALLEL ROUNDS: PARALLEL clients at once, ROUNDS times;
# prints how many fetched the page; fails unless all did.
handshakes() {
  local port=$1 parallel=$2 rounds=$3 r i ok=0
  local -a pids
  mkdir -p "$CASE/fetch"
  for ((r = 0; r < rounds; r++)); do
    pids=()
    for ((i = 0; i < parallel; i++)); do
      fetch "$port" >"$CASE/fetch/$r.$i" &
      pids+=($!)
    done
    wait "${pids[@]}"  # not the server, also a child of this shell
  done
  ok=$(cat "$CASE/fetch/"* | grep -c '^p11mux-page')
  echo "handshakes with the page: $ok of $((parallel * rounds))"
  [[ $ok == $((parallel * rounds)) ]]
}
