#!/usr/bin/env bash
# Installs the Debian 12 packages prismaquant builds with, then configures and builds it in
# Release under build/. Safe to run again. Set PQ_SKIP_APT=1 to skip the package step.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  build-essential cmake ninja-build pkg-config clang libclang-rt-14-dev
  libopenblas-openmp-dev libdnnl-dev nlohmann-json3-dev libpcre2-dev libutf8proc-dev
  libcli11-dev libfmt-dev libgtest-dev libgmock-dev libbenchmark-dev
)
if [[ "${PQ_SKIP_APT:-0}" != 1 ]]; then
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    sudo_cmd=()
    [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}"
  fi
fi

cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$(nproc)"
