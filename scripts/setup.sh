#!/usr/bin/env bash
# Installs everything p11mux needs to build, test and benchmark on Debian 12.
# Idempotent: skips apt entirely when every package is already installed.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  libboost-dev libboost-program-options-dev
  libspdlog-dev doctest-dev libp11-kit-dev
  softhsm2 opensc p11-kit p11-kit-modules gnutls-bin libnss3 libnss3-tools
  clang libclang-rt-14-dev valgrind
  clang-format clang-tidy
  gnuplot-nox
  # tests/clients: the clients and servers p11mux is tried with, and the
  # Debian package build (dpkg-shlibdeps)
  openssl libengine-pkcs11-openssl python3-pykcs11 openjdk-17-jdk-headless
  nginx-light stunnel4 dpkg-dev file
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "setup: installing ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
