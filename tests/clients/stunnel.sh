#!/usr/bin/env bash
# stunnel in threads mode, a threaded TLS server, with its key on the token:
# one process, a thread per connection, every handshake signed through the
# OpenSSL engine (libp11, which takes a session from its own pool for each
# signature, opening more as threads overlap); clients connect in parallel.
# In front of a small HTTP backend (python3 -m http.server).
here=$(dirname "$0")
source "$here/common.sh"
source "$here/tls_common.sh"
require_tools stunnel4 openssl pkcs11-tool softhsm2-util python3
require_engine

client_steps() {
  tls_key_and_cert EC:prime256v1 || return 1
  local port backend_port
  port=$(free_port)
  backend_port=$(free_port)
  mkdir -p "$CASE/www"
  echo "p11mux-page served through stunnel" >"$CASE/www/index.html"
  # The interpreter itself, not a wrapper (pyenv's shim) whose PID would be
  # stopped without it.
  local python
  python=$(python3 -c 'import sys; print(sys.executable)')
  "$python" -m http.server --bind 127.0.0.1 --directory "$CASE/www" "$backend_port" \
    >"$CASE/backend.log" 2>&1 &
  local backend=$!
  started "$backend"
  cat >"$CASE/stunnel.conf" <<EOF
foreground = yes
pid = $CASE/stunnel.pid
output = $CASE/stunnel.log
debug = notice
engine = pkcs11
engineCtrl = MODULE_PATH:$MODULE
engineCtrl = PIN:$PIN

[https]
engineId = pkcs11
accept = 127.0.0.1:$port
connect = 127.0.0.1:$backend_port
cert = $CASE/cert.pem
key = pkcs11:token=$LABEL;object=$KEY_LABEL;type=private
sessionCacheSize = 1
options = NO_TICKET
EOF
  stunnel4 "$CASE/stunnel.conf" >"$CASE/stunnel.out" 2>&1 &
  local stunnel=$!
  started "$stunnel"
  if ! wait_port "$backend_port" "$backend"; then
    echo "the backend does not listen"
    cat "$CASE/backend.log"
    return 1
  fi
  if ! wait_port "$port" "$stunnel"; then
    echo "stunnel does not listen"
    grep -F '[!]' "$CASE/stunnel.out"
    return 1
  fi
  grep -q 'Threading:PTHREAD' "$CASE/stunnel.out" && echo "stunnel runs threads"
  local rc=0
  handshakes "$port" 8 3 || rc=1
  kill "$stunnel"
  wait "$stunnel"
  echo "stunnel stopped: exit $?"
  return $rc
}

normalize() { normalize_paths; }

compare_modes
