# NSS: modutil registers the module in a fresh NSS database and lists it;
# certutil makes an EC and an RSA key pair with a self-signed certificate on the
# token, lists keys and certificates, checks each certificate's signature, and
# deletes one key and certificate.
source "$(dirname "$0")/common.sh"
require_tools modutil certutil softhsm2-util timeout

# sorted_step TEXT COMMAND...: the same, with the output normalized and sorted
# (lists in the backend's object order, which differs between tokens).
sorted_step() {
  local text=$1 rc
  shift
  echo "== $text"
  timeout -k 5 30 "$@" </dev/null >"$CASE/out" 2>&1
  rc=$?
  normalize <"$CASE/out" | LC_ALL=C sort
  echo "-> exit $rc"
  ((rc == 0)) || ((++STEP_FAILURES))
}

client_steps() {
  local db=sql:$CASE/nssdb token=$LABEL
  mkdir "$CASE/nssdb"
  echo "$PIN" >"$CASE/pin"
  head -c 64 /dev/urandom >"$CASE/noise"
  step "create the database" certutil -N -d "$db" --empty-password
  step "add the module" modutil -dbdir "$db" -add p11mux -libfile "$MODULE" -force
  step "list modules" modutil -dbdir "$db" -list
  step "list the module" modutil -dbdir "$db" -list p11mux

  step "EC key and self-signed certificate" certutil -S -d "$db" -h "$token" -f "$CASE/pin" \
    -z "$CASE/noise" -n eccert -s "CN=p11mux client EC,O=p11mux" -x -t "CT,C,C" \
    -k ec -q nistp256 -m 1 -v 1
  step "RSA key and self-signed certificate" certutil -S -d "$db" -h "$token" -f "$CASE/pin" \
    -z "$CASE/noise" -n rsacert -s "CN=p11mux client RSA,O=p11mux" -x -t "CT,C,C" \
    -k rsa -g 2048 -m 2 -v 1
  sorted_step "keys" certutil -K -d "$db" -h "$token" -f "$CASE/pin"
  sorted_step "certificates" certutil -L -d "$db" -h "$token" -f "$CASE/pin"
  step "EC certificate" certutil -L -d "$db" -h "$token" -f "$CASE/pin" -n "$token:eccert"
  for name in eccert rsacert; do
    step "check $name and its signature" certutil -V -d "$db" -h "$token" -f "$CASE/pin" \
      -n "$token:$name" -u C -e
  done
  step "delete the RSA key and certificate" certutil -F -d "$db" -h "$token" -f "$CASE/pin" \
    -n "$token:rsacert"
  sorted_step "keys" certutil -K -d "$db" -h "$token" -f "$CASE/pin"
  echo "failed steps: $STEP_FAILURES"
  ((STEP_FAILURES == 0))
}

# Differs per run: the module's library and its description (p11mux describes
# itself), the token's serial number and the slot ID SoftHSM2 derives from it,
# key ids, key bytes, signatures, fingerprints and validity dates.
normalize() {
  sed -E -e 's/^(\s+library name: ).*/\1LIBRARY/' \
    -e 's/^(\s+uri: pkcs11:)library-manufacturer=[^;]*;library-description=[^;]*;library-version=.*/\1LIBRARY/' \
    -e 's/^(Library file|Manufacturer|Description|Library Version): .*/\1: LIBRARY/' \
    -e 's/slot ID 0x[0-9a-f]+/slot ID SLOT/g' -e 's/serial=[0-9a-f]{16}/serial=SERIAL/g' \
    -e 's/^(\s+Token Serial Number: )[0-9a-f]+/\1SERIAL/' \
    -e 's/^< *[0-9]+> ([a-z]+ +)[0-9a-f]{40}/<N> \1KEYID/' \
    -e '/^\s+[0-9a-fA-F]{2}(:[0-9a-fA-F]{2})*:?$/d' \
    -e 's/^(\s+(Not Before|Not After) ?: ).*/\1DATE/'
}

compare_modes
