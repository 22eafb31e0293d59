#!/usr/bin/env bash
# The Debian package, as a user gets it (README, "Install"):
#   1. scripts/package.sh builds it from a clean Release build directory;
#   2. `dpkg-deb -x` unpacks it into a temporary root (it is never installed);
#   3. the layout: the module stripped in lib/<multiarch>/pkcs11, its p11-kit
#      module file, p11mux-load, the default configuration (a conffile setting
#      nothing) and the example; every key of the README's tables in it;
#   4. Depends names the package of every shared library the ELF files need;
#   5. pkcs11-tool --list-slots through the unpacked module over a fresh
#      SoftHSM2 token, with the shipped configuration file and with every key
#      of the example uncommented;
#   6. p11-kit list-modules and p11tool --list-tokens see the token through
#      p11mux, registered by the package's module file: twice while SoftHSM2's
#      own registration stands, once with the README's override ("The same
#      token seen twice").
# Usage: package_test.sh SOURCE_DIR BUILD_DIR (BUILD_DIR is emptied).
# Exit 77 (skip) when a tool is missing, except under CI=true.
# shellcheck disable=SC2015  # `A && B || fail`: fails when either fails, as meant
set -u
readonly SRC=$1 BUILD=$2
readonly LABEL=p11mux-package SO_PIN=12345678 PIN=123456
readonly SOFTHSM2_MODULE=/usr/lib/softhsm/libsofthsm2.so
readonly SOFTHSM2_REGISTRATION=/usr/share/p11-kit/modules/softhsm2.module

fail() {
  echo "FAIL: $*"
  exit 1
}

# need WHAT yes|"" [WHY]: skip, or fail under CI, unless present.
need() {
  local what=$1 present=$2 why=${3:-"not found (scripts/setup.sh installs it)"}
  [[ $present == yes ]] && return
  [[ -n ${CI:-} ]] && fail "$what $why"
  echo "SKIP: $what $why"
  exit 77
}
for tool in cmake cpack dpkg-deb dpkg-shlibdeps dpkg-architecture file readelf \
  pkcs11-tool softhsm2-util p11-kit p11tool pkg-config; do
  need "$tool" "$(command -v "$tool" >/dev/null && echo yes)"
done
[[ $(id -u) -eq 0 ]] && need setpriv "$(command -v setpriv >/dev/null && echo yes)"
need "$SOFTHSM2_MODULE" "$([[ -e $SOFTHSM2_MODULE ]] && echo yes)"
need "$SOFTHSM2_REGISTRATION (package softhsm2)" "$([[ -e $SOFTHSM2_REGISTRATION ]] && echo yes)"
need "p11-kit's user configuration" \
  "$(grep -qE '^[[:space:]]*user-config:[[:space:]]*none' /etc/pkcs11/pkcs11.conf 2>/dev/null || echo yes)" \
  "is off (/etc/pkcs11/pkcs11.conf: user-config: none)"

# Nothing from the caller's environment configures p11mux here.
while read -r var; do unset "$var"; done < <(compgen -e | grep '^P11MUX_')

WORK=$(mktemp -d "${TMPDIR:-/tmp}/p11mux-package.XXXXXX") || exit 1
trap 'rm -rf "$WORK"' EXIT
chmod 755 "$WORK"  # step 6 may run as nobody

# ---- 1. build ----------------------------------------------------------------------------
# ccache when there is one (the dev machines); CMake takes the launcher from the environment.
command -v ccache >/dev/null && export CMAKE_CXX_COMPILER_LAUNCHER=ccache
start=$(date +%s)
if ! "$SRC/scripts/package.sh" "$BUILD" >"$WORK/package.log" 2>&1; then
  tail -50 "$WORK/package.log"
  fail "scripts/package.sh"
fi
DEB=$(tail -1 "$WORK/package.log")
[[ -f $DEB ]] || fail "scripts/package.sh printed no .deb: $DEB"
echo "built $(basename "$DEB") ($(stat -c %s "$DEB") bytes) in $(($(date +%s) - start)) s"

# ---- 2. unpack ---------------------------------------------------------------------------
ROOT=$WORK/root
dpkg-deb -x "$DEB" "$ROOT" || fail "dpkg-deb -x"
dpkg-deb -e "$DEB" "$WORK/control" || fail "dpkg-deb -e"

# ---- 3. layout ---------------------------------------------------------------------------
MULTIARCH=$(dpkg-architecture -qDEB_HOST_MULTIARCH)
SO=$ROOT/usr/lib/$MULTIARCH/pkcs11/libp11mux.so
LOAD=$ROOT/usr/bin/p11mux-load
MODULE_FILE=$ROOT/usr/share/p11-kit/modules/p11mux.module
CONFIG=$ROOT/etc/p11mux/p11mux.conf
EXAMPLE=$ROOT/usr/share/doc/p11mux/p11mux.conf.example
for f in "$SO" "$LOAD" "$MODULE_FILE" "$CONFIG" "$EXAMPLE"; do
  [[ -f $f ]] || fail "${f#"$ROOT"} is not in the package"
done
for f in "$SO" "$LOAD"; do
  file "$f" | grep -q ', stripped' || fail "${f#"$ROOT"} is not stripped: $(file -b "$f")"
  # Debian's hardening flags (scripts/package.sh): the stack protector's symbol, and relro.
  readelf --dyn-syms -W "$f" | grep -q __stack_chk_fail || fail "${f#"$ROOT"}: built without -fstack-protector-strong"
  readelf -lW "$f" | grep -q GNU_RELRO || fail "${f#"$ROOT"}: linked without -z relro"
done
[[ -x $LOAD ]] || fail "p11mux-load is not executable"
"$LOAD" --help >/dev/null || fail "p11mux-load --help"

# The module file names the module relatively, and p11-kit resolves that name
# in its module directory, where the package put the module.
grep -qx 'module: libp11mux.so' "$MODULE_FILE" || fail "p11mux.module: $(grep module: "$MODULE_FILE")"
[[ $(pkg-config --variable p11_module_path p11-kit-1) == /usr/lib/$MULTIARCH/pkcs11 ]] ||
  fail "p11-kit looks for modules in $(pkg-config --variable p11_module_path p11-kit-1)"

grep -qx /etc/p11mux/p11mux.conf "$WORK/control/conffiles" || fail "/etc/p11mux/p11mux.conf is not a conffile"
cmp -s "$CONFIG" "$EXAMPLE" || fail "/etc/p11mux/p11mux.conf differs from the example"
set_lines=$(grep -nvE '^[[:space:]]*([#;]|\[|$)' "$CONFIG")
[[ -z $set_lines ]] || fail "the shipped configuration sets something: $set_lines"

# Every key of the README's configuration tables, commented, in its section.
# "section key" pairs: from the README's table rows, and from the example's "# key = " lines.
# shellcheck disable=SC2016  # backquotes, not expansions
readme_keys=$(sed -nE 's/^\| `(\[([a-z]+)\] )?([a-z_]+)` \| `P11MUX_[A-Z_]+` \|.*/\2 \3/p' "$SRC/README.md" | sort -u)
example_keys=$(awk '/^\[[a-z]+\]$/ { section = substr($0, 2, length($0) - 2) }
  /^# [a-z_]+ = / { print section " " $2 }' "$EXAMPLE" | sort -u)
[[ $(wc -l <<<"$readme_keys") -ge 20 ]] || fail "read only $(wc -l <<<"$readme_keys") keys from README.md"
missing=$(comm -23 <(echo "$readme_keys") <(echo "$example_keys"))
[[ -z $missing ]] || fail "keys of README.md's tables missing from docs/p11mux.conf.example: $missing"
extra=$(comm -13 <(echo "$readme_keys") <(echo "$example_keys"))
[[ -z $extra ]] || fail "keys of docs/p11mux.conf.example that README.md's tables lack: $extra"

# ---- 4. Depends --------------------------------------------------------------------------
depends=$(dpkg-deb -f "$DEB" Depends)
echo "Depends: $depends"
# depends_on PACKAGE: Depends names it.
depends_on() { tr ',' '\n' <<<"$depends" | awk '{ print $1 }' | grep -qxF "$1"; }
for pkg in libc6 libstdc++6 libgcc-s1; do
  depends_on "$pkg" || fail "Depends lacks $pkg"
done
# owner PATH: the package that ships the library (usrmerge: /lib is /usr/lib).
owner() {
  local path out
  for path in "$1" "$(realpath "$1")" "/usr$1" "/usr$(realpath "$1")" "${1#/usr}"; do
    out=$(dpkg-query -S "$path" 2>/dev/null) || continue
    echo "${out%%:*}"
    return
  done
}
for elf in "$SO" "$LOAD"; do
  while read -r soname path; do
    [[ -n $path && -e $path ]] || fail "${elf#"$ROOT"}: $soname not found"
    pkg=$(owner "$path")
    [[ -n $pkg ]] || fail "no package ships $path"
    # The package or a name it provides (libspdlog1.10 provides libspdlog1.10-fmt9, the
    # name its shlibs file gives dpkg-shlibdeps).
    found=
    for name in "$pkg" $(dpkg-query -W -f='${Provides}' "$pkg" | tr ',' '\n' | awk '{ print $1 }'); do
      depends_on "$name" && found=$name
    done
    [[ -n $found ]] || fail "${elf#"$ROOT"} needs $soname from $pkg, which Depends lacks"
  done < <(LC_ALL=C ldd "$elf" | awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }')
done

# ---- 5. pkcs11-tool through the unpacked module ------------------------------------------
# new_token DIR: a fresh SoftHSM2 token in DIR, SOFTHSM2_CONF pointing to it.
new_token() {
  mkdir -p "$1/tokens"
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$1/tokens" >"$1/softhsm2.conf"
  export SOFTHSM2_CONF=$1/softhsm2.conf
}
new_token "$WORK/direct"
softhsm2-util --init-token --free --label "$LABEL" --so-pin "$SO_PIN" --pin "$PIN" >"$WORK/init.log" 2>&1 ||
  { cat "$WORK/init.log"; fail "softhsm2-util --init-token"; }

# list_slots OUT [ENV...]: pkcs11-tool --list-slots through the unpacked module.
list_slots() {
  local out=$1
  shift
  env "$@" pkcs11-tool --module "$SO" --list-slots >"$out" 2>&1
}
printf 'module = %s\n' "$SOFTHSM2_MODULE" >"$WORK/p11mux.conf"
list_slots "$WORK/slots.txt" P11MUX_CONFIG="$WORK/p11mux.conf" && grep -q "token label *: $LABEL" "$WORK/slots.txt" ||
  { cat "$WORK/slots.txt"; fail "pkcs11-tool --list-slots through the unpacked module"; }

# The shipped configuration sets nothing: without a module p11mux refuses to start, with
# P11MUX_MODULE it runs.
list_slots "$WORK/unset.txt" P11MUX_CONFIG="$CONFIG" && { cat "$WORK/unset.txt"; fail "p11mux started without a backend"; }
grep -q 'no backend module configured' "$WORK/unset.txt" || { cat "$WORK/unset.txt"; fail "no reason given"; }
list_slots "$WORK/shipped.txt" P11MUX_CONFIG="$CONFIG" P11MUX_MODULE="$SOFTHSM2_MODULE" &&
  grep -q "token label *: $LABEL" "$WORK/shipped.txt" ||
  { cat "$WORK/shipped.txt"; fail "pkcs11-tool with the shipped configuration and P11MUX_MODULE"; }

# Every key of the example uncommented (the first line of each) is a valid configuration.
# Replaced: what names this host's files, sockets and token, and init_reserved (SoftHSM2
# refuses a non-NULL pReserved).
awk -v module="$SOFTHSM2_MODULE" -v logfile="$WORK/example.log" -v sock="unix:$WORK/metrics.sock" \
  -v token="$LABEL" '
  /^# [a-z_]+ = / {
    key = section "." $2
    if (key in seen || $2 == "init_reserved") next
    seen[key] = 1
    line = substr($0, 3)
    if ($2 == "module") line = "module = " module
    if ($2 == "file") line = "file = " logfile
    if ($2 == "listen") line = "listen = " sock
    if ($2 == "tokens") line = "tokens = label:" token
    print line
    next
  }
  /^\[[a-z]+\]$/ { section = $0; print }' "$EXAMPLE" >"$WORK/uncommented.conf"
list_slots "$WORK/uncommented.txt" P11MUX_CONFIG="$WORK/uncommented.conf" &&
  grep -q "token label *: $LABEL" "$WORK/uncommented.txt" ||
  { cat "$WORK/uncommented.conf" "$WORK/uncommented.txt"; fail "the example with every key uncommented"; }

# ---- 6. p11-kit --------------------------------------------------------------------------
# p11-kit reads ~/.config/pkcs11/modules when /etc/pkcs11/pkcs11.conf allows user
# configuration (the default), but never for root: as root, step 6 runs as nobody.
P11KIT=$WORK/p11kit
USER_MODULES=$P11KIT/home/.config/pkcs11/modules
mkdir -p "$USER_MODULES"
new_token "$P11KIT"
printf 'module = %s\n' "$SOFTHSM2_MODULE" >"$P11KIT/p11mux.conf"
# The package's module file, with the module made absolute: the relative name
# resolves to /usr/lib/<multiarch>/pkcs11/libp11mux.so, which only installing
# the package would create (checked in step 3).
sed "s|^module: libp11mux.so\$|module: $SO|" "$MODULE_FILE" >"$USER_MODULES/p11mux.module"
as_user=()
if [[ $(id -u) -eq 0 ]]; then
  chown -R 65534:65534 "$P11KIT"
  as_user=(setpriv --reuid=65534 --regid=65534 --clear-groups)
fi
# p11kit COMMAND...: in that user's environment.
p11kit() {
  env HOME="$P11KIT/home" SOFTHSM2_CONF="$SOFTHSM2_CONF" P11MUX_CONFIG="$P11KIT/p11mux.conf" "${as_user[@]}" "$@"
}
p11kit softhsm2-util --init-token --free --label "$LABEL" --so-pin "$SO_PIN" --pin "$PIN" >"$WORK/init.log" 2>&1 ||
  { cat "$WORK/init.log"; fail "softhsm2-util --init-token (p11-kit user)"; }

# seen_through OUT: the modules that show the token, one line each, sorted.
seen_through() {
  p11kit p11-kit list-modules >"$1" 2>&1 || { cat "$1"; fail "p11-kit list-modules"; }
  awk -v label="$LABEL" '/^[^ ]/ { module = $1; sub(/:$/, "", module) }
    $1 == "token:" && substr($0, index($0, ":") + 2) == label { print module }' "$1" | sort
}
# tokens_seen OUT: how many times p11tool (GnuTLS over p11-kit) lists the token.
tokens_seen() {
  p11kit p11tool --list-tokens >"$1" 2>&1 || { cat "$1"; fail "p11tool --list-tokens"; }
  grep -c "^[[:space:]]*Label: $LABEL\$" "$1"
}

through=$(seen_through "$WORK/modules-before.txt")
[[ $through == $'p11mux\nsofthsm2' ]] ||
  { cat "$WORK/modules-before.txt"; fail "p11-kit list-modules: token seen through '${through//$'\n'/, }', expected p11mux and softhsm2"; }
[[ $(tokens_seen "$WORK/tokens-before.txt") -eq 2 ]] ||
  { cat "$WORK/tokens-before.txt"; fail "p11tool --list-tokens: expected the token twice"; }

# README, "The same token seen twice": a user file of the same name with a blank module.
printf '# Hidden: p11mux loads SoftHSM2 itself.\nmodule:\n' >"$USER_MODULES/softhsm2.module"
[[ $(id -u) -eq 0 ]] && chown 65534:65534 "$USER_MODULES/softhsm2.module"
through=$(seen_through "$WORK/modules-after.txt")
[[ $through == p11mux ]] ||
  { cat "$WORK/modules-after.txt"; fail "p11-kit list-modules with the override: token seen through '${through//$'\n'/, }', expected p11mux only"; }
[[ $(tokens_seen "$WORK/tokens-after.txt") -eq 1 ]] ||
  { cat "$WORK/tokens-after.txt"; fail "p11tool --list-tokens with the override: expected the token once"; }
grep -q "^p11mux: $SO\$" "$WORK/modules-after.txt" || { cat "$WORK/modules-after.txt"; fail "p11mux not listed"; }

echo "PASS: $(basename "$DEB"): layout, Depends, pkcs11-tool, p11-kit (token twice, once with the override)"
