#!/bin/sh
# Runs inside the guest at boot (scripts/vm.sh copies it into the share as run.sh):
# installs the tree offline from the share's wheels, then runs pytest (or, for
# `vm.sh bench`, python -m bench) as root against the guest's own containerd, runc,
# systemd and cgroup v2. Its output goes to the host as the run goes; its exit status
# is pytest's (bench's).
set -eu
share=/share
{
    . /etc/os-release
    echo "distribution=$PRETTY_NAME"
    echo "kernel=$(uname -r)"
    echo "cgroup=$(stat -fc %T /sys/fs/cgroup)"
    echo "containerd=$(containerd --version | awk '{print $3}')"
    echo "runc=$(runc --version | awk 'NR==1 {print $3}')"
    echo "python=$(python3 -c 'import platform; print(platform.python_version())')"
    echo "systemd=$(systemctl --version | awk 'NR==1 {print $2}')"
    if [ -x "$share/containerd2/containerd" ]; then
        echo "containerd2=$("$share/containerd2/containerd" --version | awk '{print $3}' | sed 's/^v//')"
    fi
} >"$share/guest-info"
sed 's/^/guest: /' "$share/guest-info"
echo "guest: running ($(cut -d' ' -f1 /proc/uptime) s since boot)"
echo "guest: controllers $(cat /sys/fs/cgroup/cgroup.controllers)"

rm -rf /root/pyshim
cp -a "$share/src" /root/pyshim
cd /root/pyshim
python3 -m venv .venv
pip="$PWD/.venv/bin/pip install -q --disable-pip-version-check --no-index --find-links $share/wheels"
# setuptools first and no build isolation: no second environment made just to build.
$pip setuptools wheel
$pip --no-build-isolation -r "$share/requirements.txt" -e .
echo "guest: installed ($(cut -d' ' -f1 /proc/uptime) s since boot)"
# As scripts/install.sh does: bytecode shipped, the shim's own launcher.
.venv/bin/python -m compileall -q protocol shim manager .venv/lib >/dev/null || true
.venv/bin/python -m shim.boot.launcher .venv/bin/containerd-shim-pyshim-v1
.venv/bin/python -m shim.boot.launcher --entry manager.cli:main .venv/bin/pyshim

set --
while IFS= read -r arg; do
    set -- "$@" "$arg"
done <"$share/pytest-args"
export PATH="/root/pyshim/.venv/bin:$PATH"
if [ -x "$share/containerd2/containerd" ]; then
    export PYSHIM_CONTAINERD2_DIR="$share/containerd2"
fi
ci=$(cat "$share/ci" 2>/dev/null || true)
[ -z "$ci" ] || export CI="$ci"
status=0
if [ "$(cat "$share/module" 2>/dev/null || echo pytest)" = bench ]; then
    python -m bench --no-plot --out "$share/bench.json" "$@" || status=$?
else
    python -m pytest -p no:cacheprovider "$@" || status=$?
fi
exit "$status"
