#!/usr/bin/env bash
# The VM test tier: pyshim's integration suite inside a Debian guest with its own
# kernel, systemd, cgroup v2 and the suite's containerd/runc/Python (issue 19).
#
#   vm.sh build [SUITE]                  build (or reuse) the guest image
#   vm.sh test  [SUITE] [-- PYTEST ARGS] run the integration suite in a fresh copy of it
#   vm.sh shell [SUITE]                  a root shell in a fresh copy (the share at /share)
#   vm.sh bench [SUITE] [-- BENCH ARGS]  `python -m bench BENCH ARGS` in a fresh copy (the
#                                        guest's Python, containerd and Go shim); its JSON
#                                        goes to $PYSHIM_VM_BENCH_OUT (default
#                                        bench/results/vm-SUITE.json)
#
# SUITE is trixie (default) or sid. Options before SUITE: --tcg boots the suite's
# real kernel under qemu TCG (all cgroup v2 controllers, CRIU) instead of
# User-Mode Linux (the default: boots in seconds, one CPU, no cpuset, no CRIU).
#
# The image is a debootstrap of the Debian mirror (scripts/vm/image/ is its recipe:
# a change there rebuilds it), kept under $PYSHIM_VM_CACHE. Every run boots a
# copy-on-write layer over it, so the image stays pristine. The guest has no network:
# the tree, pyshim's dependency wheels (downloaded here for the guest's Python) and
# the script to run go in through a shared folder; a systemd unit ordered after
# containerd runs that script at boot, leaves its status in the share and powers off.
#
# Environment: PYSHIM_VM_CACHE (default /var/cache/pyshim-vm), PYSHIM_VM_MIRROR
# (default http://deb.debian.org/debian), PYSHIM_VM_MEM (default 3G),
# PYSHIM_VM_TIMEOUT (seconds for one run, default 2400), PYSHIM_VM_KEEP=1 keeps the
# run's work dir (console log, journal, results).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
tree=$(cd "$here/.." && pwd)
recipe=$here/vm/image
cache=${PYSHIM_VM_CACHE:-/var/cache/pyshim-vm}
mirror=${PYSHIM_VM_MIRROR:-http://deb.debian.org/debian}
mem=${PYSHIM_VM_MEM:-3G}
timeout=${PYSHIM_VM_TIMEOUT:-2400}

die() { echo "vm.sh: $*" >&2; exit 2; }
say() { echo "vm.sh: $*" >&2; }

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# --- the image -----------------------------------------------------------------

recipe_hash() {  # suite -> digest of everything the image is built from
    local suite=$1
    {
        echo "suite=$suite mirror=$mirror"
        (cd "$recipe" && for f in $(LC_ALL=C ls); do echo "== $f"; cat "$f"; done)
        # The build steps themselves.
        sed -n '/^# --- the image/,/^# --- end of the image/p' "$0"
    } | sha256sum | cut -c1-16
}

image_dir() { echo "$cache/$1-$(recipe_hash "$1")"; }

copy_libs() {  # binary rootfs libdir: copy the binary's shared libraries from the guest root
    local bin=$1 rootfs=$2 libdir=$3 lib found d
    mkdir -p "$libdir"
    for lib in $(patchelf --print-needed "$bin"); do
        [ -e "$libdir/$lib" ] && continue
        found=
        for d in usr/lib/x86_64-linux-gnu lib/x86_64-linux-gnu usr/lib lib; do
            if [ -e "$rootfs/$d/$lib" ]; then found=$rootfs/$d/$lib; break; fi
        done
        [ -n "$found" ] || die "library $lib of $bin not found in the guest root"
        cp -L "$found" "$libdir/$lib"
        copy_libs "$libdir/$lib" "$rootfs" "$libdir"
    done
}

build() {  # suite -> prints the image dir (built now unless already there)
    local suite=$1 dir tmp rootfs packages uml
    dir=$(image_dir "$suite")
    if [ -f "$dir/ready" ]; then echo "$dir"; return; fi
    for tool in debootstrap patchelf mkfs.ext4 gcc; do
        command -v "$tool" >/dev/null || die "$tool is missing (bash scripts/install.sh installs it)"
    done
    mkdir -p "$cache"
    tmp=$dir.tmp
    rm -rf "$tmp"
    mkdir -p "$tmp"
    rootfs=$tmp/rootfs
    packages=$(grep -v '^#' "$recipe/packages" | xargs | tr ' ' ,)
    say "building the $suite image in $dir (debootstrap, a few minutes)"
    # sid's Release file on the mirror can be past its Valid-Until: debootstrap only
    # checks the signature; apt inside the guest is told not to check the date.
    debootstrap --variant=minbase --components=main --include="$packages" \
        "$suite" "$rootfs" "$mirror" >"$tmp/debootstrap.log" 2>&1 ||
        { tail -n 30 "$tmp/debootstrap.log" >&2; die "debootstrap of $suite failed"; }
    echo 'Acquire::Check-Valid-Until "false";' >"$rootfs/etc/apt/apt.conf.d/99pyshim-vm"
    install -m 0755 "$recipe/pyshim-vm-boot" "$rootfs/usr/local/sbin/pyshim-vm-boot"
    install -m 0644 "$recipe/pyshim-vm.service" "$rootfs/etc/systemd/system/pyshim-vm.service"
    install -m 0755 "$recipe/setup.sh" "$rootfs/root/setup.sh"
    chroot "$rootfs" /root/setup.sh
    rm "$rootfs/root/setup.sh"

    # User-Mode Linux: the guest suite's kernel binary, linked against the guest's own
    # ld.so and libc (it needs a newer glibc than the host's; run through ld.so
    # directly it fails with "Too few physical memory!").
    uml=$rootfs/usr/bin/linux.uml
    [ -f "$uml" ] || die "no UML kernel in the guest root (user-mode-linux)"
    mkdir -p "$tmp/uml"
    cp "$uml" "$tmp/uml/linux"
    copy_libs "$tmp/uml/linux" "$rootfs" "$tmp/uml/lib"
    patchelf --set-interpreter "$dir/uml/lib/ld-linux-x86-64.so.2" \
        --set-rpath "$dir/uml/lib" "$tmp/uml/linux"
    # Hosts with AMX have a larger xstate than UML's ptrace buffer: see the source.
    gcc -O2 -Wall -shared -fPIC -o "$tmp/uml/uml-xstate.so" "$recipe/uml-xstate.c" -ldl
    # qemu (--tcg): the suite's real kernel and its initramfs.
    cp -L "$rootfs"/boot/vmlinuz-* "$tmp/vmlinuz"
    cp -L "$rootfs"/boot/initrd.img-* "$tmp/initrd.img"

    # Versions the guest ships, for the README's table and the test report.
    {
        echo "suite=$suite"
        echo "python=$(basename "$(readlink -f "$rootfs/usr/bin/python3")" | sed 's/^python//')"
        chroot "$rootfs" dpkg-query -W -f='${Package}=${Version}\n' \
            containerd runc python3 systemd user-mode-linux linux-image-amd64 criu
    } >"$tmp/versions"

    mkfs.ext4 -q -F -L pyshim-root -E root_owner=0:0 -d "$rootfs" "$tmp/image.raw" 8G
    rm -rf "$rootfs"
    # Older builds of this suite are stale now.
    for old in "$cache/$suite"-*; do
        [ "$old" != "$tmp" ] && [ -d "$old" ] && rm -rf "$old"
    done
    mv "$tmp" "$dir"
    touch "$dir/ready"
    say "built $dir"
    echo "$dir"
}
# --- end of the image ----------------------------------------------------------

# What `vm.sh test` runs without PYTEST ARGS: tests/guest and the integration suite,
# less what the host suite covers and this guest cannot run as the host does:
# - test_ttrpc_interop: builds a Go peer (the Go toolchain in every image) to test
#   the wire, which no kernel or cgroup changes;
# - test_crash_harness: seeded faults over hundreds of operations, CPU bound; over
#   its own time budget under User-Mode Linux on this 2-core machine;
# - test_robustness, test_manager: the ttrpc server's and pyshimd's own time bounds
#   (2 s promptness, containerd-like start deadlines) do not hold under UML, where a
#   fresh interpreter takes seconds to start; neither touches a cgroup v2 path
#   (pyshimd's limits are the same OCI spec ctr's are);
# - test_template: forked shims take the daemon's command line through PR_SET_MM_MAP,
#   and the pages test needs KSM: Debian's UML kernel has neither
#   CONFIG_CHECKPOINT_RESTORE nor CONFIG_KSM (both are in the suite's real kernel:
#   --tcg);
# - test_start_stress: 600 starts beside two CPU hogs is a host-load test; UML has one
#   CPU;
# - test_manager_{network,readme,volumes,observe,lifecycle,pull,reboot}: CNI's bridge and
#   portmap need NAT in nf_tables (`TABLE_ADD failed (Operation not supported): table
#   nat` in the UML guest), which Debian's UML kernel lacks (and sid's image has no
#   iptables at all); they run on the host;
# - test_containerd_killed_and_restarted: a container that exits while containerd 1.7
#   is down is gone after the restart ("cleaning leaked shim process": its task lists
#   no pids then), where 1.6 reports it STOPPED, as the test expects (README, Known
#   limits).
# - test_stale_socket_gets_new_daemon: finds the new daemon by its command line, which
#   a daemon forked from the template keeps as the template's under UML (no
#   PR_SET_MM_MAP, as for test_template); whether the second start is forked or
#   re-executed depends on timing (failed once in sid, passed in trixie).
# sid only (sid_pytest): the suite takes the containerd on PATH for Debian 12's 1.6
# (host "1.6": 1.x's config, messages and types), and sid's is 2.1:
# - test_pod_lifecycle_on_pyshim[1.6]: 2.1 records task API 2 in each task's
#   bootstrap.json, where the test expects none from 1.x (2.3's v3 is checked in [2.3]);
# - test_shim_cgroup_from_the_go_clients_legacy_create_options: 2.x no longer knows
#   containerd.linux.runc.CreateOptions ("type with url ... not found"), the 1.x type
#   the test sends through containerd;
# - test_update_pause_resume_ps_checkpoint[1.6]: ctr 2.x words the refused checkpoint
#   as 2.3's ctr does, which the [2.3] case checks.
default_pytest=(-m integration tests/integration tests/guest
    --ignore=tests/integration/test_ttrpc_interop.py
    --ignore=tests/integration/test_crash_harness.py
    --ignore=tests/integration/test_robustness.py
    --ignore=tests/integration/test_manager.py
    --ignore=tests/integration/test_template.py
    --ignore=tests/integration/test_start_stress.py
    --ignore=tests/integration/test_manager_network.py
    --ignore=tests/integration/test_manager_readme.py
    --ignore=tests/integration/test_manager_volumes.py
    --ignore=tests/integration/test_manager_observe.py
    --ignore=tests/integration/test_manager_lifecycle.py
    --ignore=tests/integration/test_manager_pull.py
    --ignore=tests/integration/test_manager_reboot.py
    --deselect=tests/integration/test_ctr_lifecycle.py::test_containerd_killed_and_restarted
    --deselect=tests/integration/test_shim_cli.py::test_stale_socket_gets_new_daemon
    --durations=15)
sid_pytest=(
    "--deselect=tests/integration/test_cri.py::test_pod_lifecycle_on_pyshim[1.6]"
    --deselect=tests/integration/test_ctr_lifecycle.py::test_shim_cgroup_from_the_go_clients_legacy_create_options
    "--deselect=tests/integration/test_stats_oom.py::test_update_pause_resume_ps_checkpoint[1.6]")

# --- one boot --------------------------------------------------------------------

wheels() {  # python version (3.13) share dir: pyshim's dependencies as wheels for it
    local pyver=$1 out=$2 wheel_cache=$cache/wheels-$1 reqs pip_python=python3
    local work_log=$out/../pip-download.log
    # The host's venv (scripts/install.sh) has pip; Debian's python3 may not.
    [ -x "$tree/.venv/bin/python" ] && pip_python=$tree/.venv/bin/python
    mkdir -p "$wheel_cache" "$out"
    # What the guest runs: pyshim's own dependencies and the test runner (not the
    # linters, type checker or proto generator, which run on the host).
    reqs=$("$pip_python" - "$tree/pyproject.toml" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
wanted = {"pytest", "pytest-asyncio", "grpcio"}
reqs = list(project["dependencies"])
reqs += [r for r in project["optional-dependencies"]["test"]
         if re.split(r"[<>=!~ ]", r, maxsplit=1)[0] in wanted]
print("\n".join(reqs + ["setuptools>=68", "wheel"]))
EOF
)
    # shellcheck disable=SC2086
    if ! (cd "$wheel_cache" && echo "$reqs" | xargs -d '\n' "$pip_python" -m pip download -q \
        --disable-pip-version-check --only-binary=:all: --python-version "$pyver" \
        --implementation cp -d "$wheel_cache") >"$work_log" 2>&1; then
        grep -v "^WARNING: Location" "$work_log" >&2 || true
        die "could not download the wheels for Python $pyver"
    fi
    cp "$wheel_cache"/*.whl "$out/"
    echo "$reqs" | grep -v -e '^setuptools' -e '^wheel' >"$out/../requirements.txt"
}

prepare_share() {  # image dir, work dir, pytest args...
    local dir=$1 work=$2 pyver
    shift 2
    local share=$work/share
    mkdir -p "$share/src"
    pyver=$(sed -n 's/^python=//p' "$dir/versions")
    wheels "$pyver" "$share/wheels"
    # The current tree as it is on disk (uncommitted changes included), without
    # ignored files (the host's venv, caches).
    (cd "$tree" && git ls-files -z --cached --others --exclude-standard |
        xargs -0 -I{} sh -c 'test -e "{}" && printf "%s\0" "{}"' |
        tar --null -T - -cf -) | tar -C "$share/src" -xf -
    install -m 0644 "$here/vm/guest-test.sh" "$share/run.sh"
    cp "$dir/versions" "$share/versions"
    # containerd 2.3 (static binaries) for the tests marked for both hosts, as on the
    # host: $PYSHIM_CONTAINERD2_DIR, else the shared tarball beside the tree. Without
    # either the guest runs those cases as the host would (skipped; failed in CI).
    local ctrd2_tar=$tree/../shared/containerd/containerd-2.3.4-linux-amd64.tar.xz
    if [ -n "${PYSHIM_CONTAINERD2_DIR:-}" ]; then
        mkdir -p "$share/containerd2"
        cp -L "$PYSHIM_CONTAINERD2_DIR"/{bin/,}{containerd,ctr,containerd-shim-runc-v2} \
            "$share/containerd2/" 2>/dev/null || true
    elif [ -f "$ctrd2_tar" ]; then
        mkdir -p "$share/containerd2"
        tar -C "$share/containerd2" -xJf "$ctrd2_tar" --strip-components=1 \
            bin/containerd bin/ctr bin/containerd-shim-runc-v2
    fi
    printf '%s\n' "${CI:-}" >"$share/ci"
    printf '%s\n' "$guest_module" >"$share/module"
    printf '%s\n' "$@" >"$share/pytest-args"
}

boot() {  # mode (test|shell), tcg (0|1), image dir, work dir
    local mode=$1 tcg=$2 dir=$3 work=$4 share=$4/share
    if [ "$tcg" = 1 ]; then
        command -v qemu-system-x86_64 >/dev/null ||
            die "qemu-system-x86_64 is missing (PYSHIM_VM_TCG=1 bash scripts/install.sh installs it)"
        qemu-img create -q -f qcow2 -F raw -b "$dir/image.raw" "$work/root.qcow2"
        local cmdline="root=/dev/vda rw console=ttyS0 pyshim.share=9p pyshim.mode=$mode quiet"
        if [ "$mode" = shell ]; then
            cmdline="$cmdline systemd.wants=console-getty.service"
        else
            cmdline="$cmdline systemd.mask=getty.target"
        fi
        # Single-threaded TCG: sid's kernel panicked once under multi-threaded TCG.
        # The image is only ever read (each run writes its own overlay), and UML
        # guests booted from it hold POSIX locks on it that qemu's default locking
        # refuses ("Failed to get \"consistent read\" lock"): no lock on the backing file.
        local args=(qemu-system-x86_64 -accel tcg,thread=single -cpu max -smp 2 -m "$mem"
            -no-reboot -display none -nic none
            -kernel "$dir/vmlinuz" -initrd "$dir/initrd.img"
            -drive "file=$work/root.qcow2,if=virtio,format=qcow2,backing.file.locking=off"
            -virtfs "local,path=$share,mount_tag=share,security_model=passthrough,id=share"
            -append "$cmdline")
        if [ "$mode" = shell ]; then
            "${args[@]}" -serial mon:stdio
        else
            setsid "${args[@]}" -serial "file:$work/console.log" </dev/null >/dev/null 2>&1 &
            echo $! >"$work/vm.pid"
        fi
    else
        # UML's RAM is a file in TMPDIR: keep it in memory.
        export LD_PRELOAD=$dir/uml/uml-xstate.so
        local args=("$dir/uml/linux" "ubd0=$work/root.cow,$dir/image.raw" root=/dev/ubda rw
            rootflags=noinit_itable
            "mem=$mem" con=null "pyshim.share=hostfs:$share" "pyshim.mode=$mode" quiet)
        if [ "$mode" = shell ]; then
            TMPDIR=/dev/shm "${args[@]}" con0=fd:0,fd:1 systemd.wants=console-getty.service
            stty sane 2>/dev/null || true
        else
            # No logins on a test run (UML's gettys only complain on a null console).
            TMPDIR=/dev/shm setsid "${args[@]}" con0=null,fd:1 systemd.mask=getty.target \
                </dev/null >"$work/console.log" 2>&1 &
            echo $! >"$work/vm.pid"
        fi
    fi
}

run_test() {  # suite tcg pytest-args...
    local suite=$1 tcg=$2 dir work pid status started
    shift 2
    dir=$(build "$suite")
    work=$(mktemp -d /dev/shm/pyshim-vm.XXXXXX)
    # shellcheck disable=SC2064
    trap "cleanup '$work'" EXIT
    if [ $# -eq 0 ] && [ "$guest_module" = pytest ]; then
        set -- "${default_pytest[@]}"
        [ "$suite" != sid ] || set -- "$@" "${sid_pytest[@]}"
        # CRIU needs CHECKPOINT_RESTORE, which only the real kernel has (the last -m wins).
        [ "$tcg" = 1 ] || set -- "$@" -m "integration and not criu"
    fi
    prepare_share "$dir" "$work" "$@"
    : >"$work/share/run.log"
    started=$(date +%s)
    say "booting $suite ($([ "$tcg" = 1 ] && echo "qemu TCG" || echo "User-Mode Linux")), work dir $work"
    boot test "$tcg" "$dir" "$work"
    pid=$(cat "$work/vm.pid")
    # The guest writes its log into the share as it goes: follow it until the VM is off.
    tail -n +1 -f --pid="$pid" "$work/share/run.log" &
    local tailer=$!
    local waited=0
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$waited" -ge "$timeout" ]; then
            say "timed out after ${timeout}s: stopping the VM"
            kill -TERM -- "-$pid" 2>/dev/null || true
            sleep 5
            kill -KILL -- "-$pid" 2>/dev/null || true
            break
        fi
        sleep 2
        waited=$((waited + 2))
    done
    wait "$tailer" 2>/dev/null || true
    status=$(cat "$work/share/status" 2>/dev/null || echo none)
    say "$suite: guest run took $(($(date +%s) - started))s, status $status"
    if [ "$guest_module" = bench ] && [ -f "$work/share/bench.json" ]; then
        local out=${PYSHIM_VM_BENCH_OUT:-$tree/bench/results/vm-$suite.json}
        cp "$work/share/bench.json" "$out"
        say "bench results: $out"
    fi
    if [ "$status" != 0 ] && [ -f "$work/share/journal.log" ]; then
        # A test that saw a process vanish ("ttrpc: closed") is explained here, if at all.
        say "the guest's kernel on processes that died (journal):"
        grep -E "segfault|traps:|general protection|Out of memory|Killed process|code=dumped" \
            "$work/share/journal.log" | tail -n 20 >&2 || say "(nothing)"
    fi
    if [ "$status" = none ]; then
        say "the guest left no status; console tail:"
        tail -n 40 "$work/console.log" >&2 || true
        status=1
    elif [ "$guest_module" = pytest ] && ! check_tested_on "$work/share/guest-info" "$tcg"; then
        # sid moves every day: its row is kept up to date by hand, trixie's must hold
        # (a failed run keeps pytest's status).
        [ "$suite" = sid ] || [ "$status" != 0 ] || status=3
    fi
    return "$status"
}

check_tested_on() {  # guest-info tcg: README's "Tested on" rows for this guest are true
    local info=$1 tcg=$2 head tail row rows=() missing=0
    info() { sed -n "s/^$1=//p" "$info"; }
    head="| $(info distribution) | $(info kernel) ($([ "$tcg" = 1 ] && echo "qemu TCG" ||
        echo "User-Mode Linux")) | $(info cgroup | sed 's/^cgroup2fs$/v2/'); cgroupfs and systemd drivers |"
    tail="| $(info runc) | $(info python) |"
    rows+=("$head $(info containerd) $tail")
    # containerd 2.3 from the share, for the tests marked for both hosts.
    [ -z "$(info containerd2)" ] ||
        rows+=("$head $(info containerd2) (\`../shared/containerd\`, the tests marked for both hosts) $tail")
    for row in "${rows[@]}"; do
        if ! grep -qF -- "$row" "$tree/README.md"; then
            say "README.md's \"Tested on\" table has no row for this guest; it should read:"
            echo "$row" >&2
            missing=1
        fi
    done
    return "$missing"
}

cleanup() {
    local work=$1
    if [ -f "$work/vm.pid" ]; then
        local pid
        pid=$(cat "$work/vm.pid")
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    if [ "${PYSHIM_VM_KEEP:-0}" = 1 ]; then
        say "kept $work"
    else
        rm -rf "$work"
    fi
}

run_shell() {  # suite tcg
    local suite=$1 tcg=$2 dir work
    dir=$(build "$suite")
    work=$(mktemp -d /dev/shm/pyshim-vm.XXXXXX)
    # shellcheck disable=SC2064
    trap "cleanup '$work'" EXIT
    prepare_share "$dir" "$work"
    say "shell in $suite; /share holds the tree (src/), wheels/ and run.sh; 'poweroff' to leave"
    boot shell "$tcg" "$dir" "$work"
}

# --- command line ------------------------------------------------------------------

[ $# -ge 1 ] || usage
guest_module=pytest  # what the guest runs: pytest (test), or bench (python -m bench)
cmd=$1
shift
tcg=0
suite=trixie
while [ $# -gt 0 ]; do
    case $1 in
        --tcg) tcg=1 ;;
        trixie | sid) suite=$1 ;;
        --) shift; break ;;
        *) usage ;;
    esac
    shift
done
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, UML's hostfs, the guest's root disk)"
case $cmd in
    build) build "$suite" >/dev/null ;;
    path) image_dir "$suite" ;;  # where the image of the current recipe is (or would be)
    test) run_test "$suite" "$tcg" "$@" ;;
    bench) guest_module=bench; run_test "$suite" "$tcg" "$@" ;;
    shell) run_shell "$suite" "$tcg" ;;
    *) usage ;;
esac
