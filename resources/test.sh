#!/usr/bin/env bash
# The test command (README): installs what the tests need, builds the test guest (cached), checks
# formatting and lints, and runs every test, including the ones that boot real guests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# g++: libFuzzer, which the fuzz targets link, is C++.
need=()
for p in acpica-tools python3-fusepy e2fsprogs qemu-utils g++; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
    sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -q >&2 || true
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}"
fi

bash resources/build-guest.sh all

# QEMU's own QMP client library, which the tests drive the control socket with.
pylib="${HOTPLUG_VMM_CACHE:-$HOME/.cache/hotplug-vmm}/pylib"
if ! PYTHONPATH="$pylib" python3 -c 'import qemu.qmp' 2>/dev/null; then
    python3 -m pip install --quiet --root-user-action=ignore --target "$pylib" qemu.qmp
fi
export PYTHONPATH="$pylib${PYTHONPATH:+:$PYTHONPATH}"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The library crates: documented without warnings, their examples run, publishable.
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
for example in root_port_slot virtio_blk_request hotplug_control; do
    cargo run --quiet -p hotplug-vmm-devices --example "$example" >/dev/null
done
cargo publish --dry-run --quiet --allow-dirty \
    -p hotplug-vmm-platform -p hotplug-vmm-devices -p hotplug-vmm-acpi
# The fuzz targets (fuzz/, resources/fuzz.sh), FUZZ_SECONDS each, built and run at the lowest
# priority beside the tests: they take the CPU time the guests leave idle.
fuzz_log="$(mktemp)"
nice -n 19 bash resources/fuzz.sh "${FUZZ_SECONDS:-20}" >"$fuzz_log" 2>&1 &
fuzz_pid=$!
trap 'kill "$fuzz_pid" 2>/dev/null || true' EXIT

# Guest boots are slow on PVM hosts; two at a time fits 2 cores. To keep CI within its time,
# some guest tests run shorter here than in a plain `cargo test`: the leak checks 20 hot-plug
# cycles each, not 50 (their count is exact: one fd or thread left by any cycle fails them);
# the hostile guest 30 s, not 60; the control-plane soak 400 operations, not 1,000.
HOTPLUG_VMM_HOTPLUG_CYCLES="${HOTPLUG_VMM_HOTPLUG_CYCLES:-20}" \
HOTPLUG_VMM_HOSTILE_SECONDS="${HOTPLUG_VMM_HOSTILE_SECONDS:-30}" \
HOTPLUG_VMM_SOAK_OPS="${HOTPLUG_VMM_SOAK_OPS:-400}" \
    cargo test --workspace -- --test-threads="${TEST_THREADS:-2}"

fuzz_status=0
wait "$fuzz_pid" || fuzz_status=$?
cat "$fuzz_log"
exit "$fuzz_status"
