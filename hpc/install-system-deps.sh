#!/usr/bin/env bash
# Debian packages dodo and its tests need: Open MPI (mpirun stands in for jsrun; mpi4py builds
# against it), and for the Slurm tests a real Slurm 22.05 with munge (slurmctld, slurmd,
# slurm-client; hpc/testcluster/slurm-testcluster.sh runs them). Installs only what is
# missing; needs root (or sudo) for that. Without root the Slurm packages are left out (the
# Slurm tests then skip, saying why).
set -euo pipefail

packages=()
command -v mpirun >/dev/null 2>&1 || packages+=(openmpi-bin)
command -v mpicc >/dev/null 2>&1 || packages+=(libopenmpi-dev)
slurm=()
command -v slurmctld >/dev/null 2>&1 || slurm+=(slurmctld)
command -v slurmd >/dev/null 2>&1 || slurm+=(slurmd)
command -v sbatch >/dev/null 2>&1 || slurm+=(slurm-client)
command -v munged >/dev/null 2>&1 || slurm+=(munge)

if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo="sudo"
else
  [ ${#slurm[@]} -gt 0 ] && echo "dodo: not root: leaving out the Slurm test packages (${slurm[*]})" >&2
  slurm=()
  [ ${#packages[@]} -eq 0 ] && exit 0
  echo "dodo: missing Debian packages: ${packages[*]}; install them as root (apt-get install ${packages[*]})" >&2
  exit 1
fi
packages+=("${slurm[@]}")
[ ${#packages[@]} -eq 0 ] && exit 0
echo "dodo: installing Debian packages: ${packages[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
