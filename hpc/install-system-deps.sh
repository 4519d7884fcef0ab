#!/usr/bin/env bash
# Debian packages dodo and its tests need: Open MPI (mpirun stands in for jsrun; mpi4py builds
# against it). Installs only what is missing; needs root (or sudo) for that.
set -euo pipefail

packages=()
command -v mpirun >/dev/null 2>&1 || packages+=(openmpi-bin)
command -v mpicc >/dev/null 2>&1 || packages+=(libopenmpi-dev)
[ ${#packages[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
  echo "dodo: missing Debian packages: ${packages[*]}; install them as root (apt-get install ${packages[*]})" >&2
  exit 1
fi
echo "dodo: installing Debian packages: ${packages[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
