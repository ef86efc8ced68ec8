#!/usr/bin/env bash
# Builds the fuzz targets (fuzz/) with libFuzzer's coverage instrumentation on the stable
# toolchain — the flags `cargo fuzz build --sanitizer none` passes — and runs each for a bounded
# time from its seed corpus (fuzz/corpus/TARGET, read only: what a run finds goes to a scratch
# copy). A target that fails leaves its input under fuzz/artifacts/TARGET/ and fails the script.
#
#   resources/fuzz.sh [SECONDS] [TARGET...]   # default: 20 s each, every target
#
# Longer runs (issue 21 asks 30 minutes each): resources/fuzz.sh 1800 root_port
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

seconds="${1:-20}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(virtio_blk_request snapshot_stream root_port pci_segment acpi_hotplug virtio_pci qmp_protocol cli)
fi

host="$(rustc -vV | sed -n 's/^host: //p')"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/target}"
# --target keeps the instrumentation out of build scripts and proc macros.
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
    cargo build --quiet --release --locked --target "$host" --bins

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
status=0
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t" "artifacts/$t"
    if [ -d "corpus/$t" ]; then cp -r "corpus/$t/." "$scratch/$t/"; fi
    log="$scratch/$t.log"
    if "$CARGO_TARGET_DIR/$host/release/$t" -max_total_time="$seconds" -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
        "$scratch/$t" >"$log" 2>&1; then
        runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
        cov="$(grep -o 'cov: [0-9]*' "$log" | tail -1)"
        echo "fuzz $t: ${runs:-?} runs in ${seconds} s, ${cov:-cov: ?}, no failure"
    else
        echo "fuzz $t: FAILED; input in fuzz/artifacts/$t/" >&2
        grep -E "panicked|assert|ERROR|SUMMARY" -A4 "$log" | head -30 >&2
        status=1
    fi
done
exit $status
