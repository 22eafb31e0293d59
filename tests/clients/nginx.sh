#!/usr/bin/env bash
# nginx, a forked TLS server, with its key on the token: the master loads the
# key through the OpenSSL engine (OPENSSL_CONF in its environment), forks two
# workers with their environment cleared (no `env P11MUX_CONFIG;`), and the
# workers sign every handshake. Through p11mux the workers' p11mux must start
# from the master's configuration, since P11MUX_CONFIG never reaches them.
here=$(dirname "$0")
source "$here/common.sh"
source "$here/tls_common.sh"
require_tools nginx openssl pkcs11-tool softhsm2-util
require_engine

client_steps() {
  tls_key_and_cert EC:prime256v1 || return 1
  local port
  port=$(free_port)
  mkdir -p "$CASE/www" "$CASE/logs"
  echo "p11mux-page served by nginx" >"$CASE/www/index.html"
  nginx_conf "$CASE" "$port" "$CASE/cert.pem" "$KEY_URI" notice "root $CASE/www" \
    >"$CASE/nginx.conf"
  OPENSSL_CONF=$CASE/openssl.cnf nginx -p "$CASE" -c "$CASE/nginx.conf" &
  local nginx=$!
  started "$nginx"
  if ! wait_port "$port" "$nginx"; then
    echo "nginx does not listen"
    cat "$CASE/error.log" 2>/dev/null
    return 1
  fi
  # The workers: two, and P11MUX_CONFIG is not in their environment.
  local w workers=0 clean=0
  for ((w = 0; w < 50; w++)); do
    [[ $(pgrep -c -P "$nginx") == 2 ]] && break
    sleep 0.1
  done
  for w in $(pgrep -P "$nginx"); do
    workers=$((workers + 1))
    tr '\0' '\n' <"/proc/$w/environ" | grep -q '^P11MUX_' || clean=$((clean + 1))
  done
  echo "workers: $workers, without P11MUX_ in their environment: $clean"
  local rc=0
  handshakes "$port" 4 6 || rc=1
  kill "$nginx"
  wait "$nginx"
  echo "nginx stopped: exit $?"
  local errors
  errors=$(grep -cE '\[(alert|emerg|crit)\]' "$CASE/error.log")
  echo "nginx errors logged: $errors"
  grep -m1 -E '\[(alert|emerg|crit)\]' "$CASE/error.log"
  return $rc
}

# nginx's log lines without their time, process IDs and ports.
normalize() {
  normalize_paths | sed -E 's|^[0-9/]+ [0-9:]+ \[|[|; s|\] [0-9]+#[0-9]+: |] |; s|127\.0\.0\.1:[0-9]+|127.0.0.1:PORT|g'
}

compare_modes
