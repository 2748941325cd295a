#!/usr/bin/env bash
# Installs everything pyshim needs on a fresh Debian 12 machine (run as root):
# the distribution packages (runc, containerd, Go + Go ttrpc for interop tests,
# busybox-static for test images, CNI plugins) and a virtualenv at .venv with
# pyshim installed in editable mode, plus links of the three commands into
# /usr/local/bin so that containerd finds the shim on its PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(runc containerd golang-go golang-github-containerd-ttrpc-dev
              busybox-static containernetworking-plugins iptables curl docker-registry
              python3-venv iproute2 procps)
# The VM test tier (scripts/vm.sh): debootstrap builds the guest image, patchelf links
# the guest's User-Mode Linux kernel to the guest's own libc, gcc builds its ptrace
# helper (scripts/vm/image/uml-xstate.c). qemu only for
# `vm.sh --tcg` (the suite's real kernel, for CRIU and cpuset): PYSHIM_VM_TCG=1.
apt_packages+=(debootstrap patchelf e2fsprogs gcc libc6-dev)
if [ "${PYSHIM_VM_TCG:-0}" = 1 ]; then
    apt_packages+=(qemu-system-x86 qemu-utils)
fi
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # docker-registry is for the pull tests, which start their own on loopback: the
    # system service its package starts (on :5000) is stopped, unless it was here before.
    if [[ " ${missing[*]} " == *" docker-registry "* ]] && command -v systemctl >/dev/null &&
       [ -d /run/systemd/system ]; then
        systemctl disable --now docker-registry >/dev/null 2>&1 || true
    fi
fi

# Debian's own interpreter by default: it is statically linked and starts ~1.5 ms
# faster than a shared-libpython build (pyenv's), and the shim pays interpreter
# start-up on every `start` and `delete`. PYTHON=... picks another.
if [ -n "${PYTHON:-}" ]; then
    python=$PYTHON
elif [ -x /usr/bin/python3 ]; then
    python=/usr/bin/python3
else
    python=python3
fi
if [ -x .venv/bin/python ] &&
   [ "$(readlink -f .venv/bin/python)" != "$(readlink -f "$(command -v "$python")")" ]; then
    rm -rf .venv  # made from another interpreter: rebuild rather than mix
fi
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e ".[test,bench]"

# The shim's interpreter starts for every container (start, daemon, delete): ship
# compiled bytecode so no start pays for compiling, even where the environment
# sets PYTHONDONTWRITEBYTECODE (imports then never write .pyc themselves).
.venv/bin/python -m compileall -q -j 0 protocol shim manager crashtest .venv/lib >/dev/null || true
# The shim's own launcher over pip's wrapper: same entry point, started with -IS and
# an explicit sys.path (skips site and the editable finder, ~20 ms per invocation).
.venv/bin/python -m shim.boot.launcher .venv/bin/containerd-shim-pyshim-v1
# The same for the `pyshim` CLI, started once per command.
.venv/bin/python -m shim.boot.launcher --entry manager.cli:main .venv/bin/pyshim

# Same-page merging is opt-in (PYSHIM_KSM=1): scripts/ksm.sh says why.
bash scripts/ksm.sh

for cmd in containerd-shim-pyshim-v1 pyshimd pyshim pyshim-crashtest; do
    ln -sf "$PWD/.venv/bin/$cmd" "/usr/local/bin/$cmd"
done
