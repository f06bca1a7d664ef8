#!/usr/bin/env bash
# Install everything wqsupervisor, its demo and its tests need on Debian (bookworm):
# the Debian packages (with sudo when not root), then a virtualenv in .venv.
# Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(
    openssh-server openssh-client autossh        # the tunnel, the test head node, the comparator
    coop-computing-tools python3-workqueue       # work_queue_worker/_server/_factory, a GIL-holding master
    iproute2 iptables procps psmisc util-linux   # the firewall lab, process checks, setpriv
    slurm-wlm munge                              # a real single-node Slurm for the scaling tests
    tmux                                         # the live view's terminal test
    socat                                        # the benchmark's floor for two relay hops
    python3-venv
)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[all,test]'
echo "setup: ready ($(.venv/bin/python --version), wqsupervisor $(.venv/bin/python -c 'import wqsupervisor; print(wqsupervisor.__version__)'))"
