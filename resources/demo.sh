#!/usr/bin/env bash
# The demo (README): builds the test guest if needed and the VMM, boots the guest and shows what
# it sees. `resources/demo.sh --shell` gives you the guest's console instead (Ctrl-A x quits).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
kernel=${DEMO_KERNEL:-6.1}
bash resources/build-guest.sh "$kernel" initramfs
cargo build --release -q -p hotplug-vmm
exec python3 resources/demo.py --kernel-version "$kernel" "$@"
