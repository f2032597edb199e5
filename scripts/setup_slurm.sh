#!/usr/bin/env bash
# Installs a single-node SLURM (Debian's slurm-wlm) + munge so tests can submit the launch/slurm/*.sbatch
# scripts for real on localhost. Idempotent: does nothing when slurmctld, slurmd, munged and sbatch are present.
# Starting the daemons is the test's job (tests/test_launch_slurm.py writes its own slurm.conf).
# Needs root (apt-get); prints why and exits 1 otherwise.
set -euo pipefail

have_all() { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; } >/dev/null 2>&1
if have_all; then
  echo "setup_slurm: already installed (slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm 2>/dev/null || echo "?"))"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "setup_slurm: need root to apt-get install slurm-wlm munge (run with sudo)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# slurm-wlm pulls slurmctld + slurmd + client tools; munge is its authentication daemon.
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
have_all || { echo "setup_slurm: install finished but SLURM/munge binaries are missing" >&2; exit 1; }
echo "setup_slurm: installed (slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm))"
