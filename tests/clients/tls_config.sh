# shellcheck shell=bash
# The configuration files of the TLS tests (tls_common.sh, openssl.sh) and of
# scripts/bench.sh's tls section, written once. Each function prints a file to
# standard output; sourcing this file has no other effect.

# openssl_engine_conf ENGINE MODULE INIT [PIN]: an openssl.cnf that loads the
# libp11 engine ENGINE (its .so) for the PKCS#11 MODULE. INIT 1 initializes the
# engine as the file loads: servers such as nginx load keys from an engine
# without initializing it.
openssl_engine_conf() {
  cat <<CONF
openssl_conf = openssl_init

[openssl_init]
engines = engine_section

[engine_section]
pkcs11 = pkcs11_section

[pkcs11_section]
engine_id = pkcs11
dynamic_path = $1
MODULE_PATH = $2
init = $3
CONF
  [[ -z ${4:-} ]] || echo "PIN = $4"
}

# nginx_conf DIR PORT CERT KEY_URI LOG_LEVEL [DIRECTIVE...]: nginx, 2 forked
# workers, serving TLS on 127.0.0.1:PORT with the key on the token (no session
# resumption: every handshake signs), everything it writes under DIR; each
# DIRECTIVE is added to the server block.
nginx_conf() {
  local dir=$1 port=$2 cert=$3 key=$4 level=$5
  shift 5
  # `user` only when started as root (nginx then switches to it).
  [[ $(id -u) != 0 ]] || echo "user root;"
  cat <<CONF
daemon off;
master_process on;
worker_processes 2;
pid $dir/nginx.pid;
error_log $dir/error.log $level;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $dir/tmp-body;
  proxy_temp_path $dir/tmp-proxy;
  fastcgi_temp_path $dir/tmp-fastcgi;
  uwsgi_temp_path $dir/tmp-uwsgi;
  scgi_temp_path $dir/tmp-scgi;
  server {
    listen 127.0.0.1:$port ssl;
    ssl_certificate $cert;
    ssl_certificate_key "engine:pkcs11:$key";
    ssl_session_cache off;
    ssl_session_tickets off;
CONF
  local directive
  for directive in "$@"; do
    echo "    $directive;"
  done
  printf '  }\n}\n'
}
