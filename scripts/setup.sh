#!/usr/bin/env bash
# Installs what the build needs and is missing, on Debian/Ubuntu:
#   cmake ninja-build libgtest-dev libbenchmark-dev pybind11-dev python3-dev
# (the CUDA toolkit is not installed here: it is only checked for).
# Each need is detected by what the build uses (a command, a header, the
# Python on PATH), so a machine with everything makes no apt call, and
# pybind11 installed by pip for that Python counts. Where apt cannot install
# (no root, no network) it says what is missing and exits 0: the build then
# reports, or skips the Python package.
set -u

have_header() {  # any of the usual include roots holds $1
  local d
  for d in /usr/include /usr/local/include; do [ -f "$d/$1" ] && return 0; done
  return 1
}
python_headers() {  # Python.h of the python3 CMake will build the package for
  command -v python3 >/dev/null 2>&1 &&
    python3 -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null
}
pybind11_present() {  # pip's (for python3 on PATH) or a system CMake package
  command -v python3 >/dev/null 2>&1 && python3 -m pybind11 --cmakedir >/dev/null 2>&1 && return 0
  local d
  for d in /usr/lib/cmake /usr/share/cmake /usr/local/lib/cmake /usr/local/share/cmake; do
    [ -f "$d/pybind11/pybind11Config.cmake" ] && return 0
  done
  return 1
}

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v ninja >/dev/null 2>&1 || missing+=(ninja-build)
have_header gtest/gtest.h || missing+=(libgtest-dev)
have_header benchmark/benchmark.h || missing+=(libbenchmark-dev)
python_headers || missing+=(python3-dev)
pybind11_present || missing+=(pybind11-dev)

command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ] ||
  echo "setup.sh: note: nvcc not found; the build needs the CUDA Toolkit 13 (not installed by this script)"

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup.sh: all build dependencies present"
  exit 0
fi
echo "setup.sh: missing: ${missing[*]}"

if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup.sh: no apt-get here; install them by other means (pybind11: python3 -m pip install pybind11)"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: not root; run: sudo apt-get update && sudo apt-get install -y ${missing[*]}"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# Bounded: on a machine without network apt must fail, not hang.
apt_() { timeout 600 apt-get -o Acquire::Retries=1 -o Acquire::http::Timeout=20 "$@"; }
# Refresh the package lists only when the install cannot proceed without it.
if ! apt_ install -y --no-install-recommends "${missing[@]}" >/tmp/kvcomp_setup_apt.log 2>&1; then
  if ! apt_ update -q >>/tmp/kvcomp_setup_apt.log 2>&1 ||
     ! apt_ install -y --no-install-recommends "${missing[@]}" >>/tmp/kvcomp_setup_apt.log 2>&1; then
    echo "setup.sh: apt-get could not install ${missing[*]} (log: /tmp/kvcomp_setup_apt.log):"
    tail -5 /tmp/kvcomp_setup_apt.log | sed 's/^/  /'
    echo "setup.sh: continuing; pybind11 can also come from pip (python3 -m pip install pybind11)"
    exit 0
  fi
fi
echo "setup.sh: installed ${missing[*]}"
exit 0
