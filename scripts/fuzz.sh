#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser that sees network or file input
# (libFuzzer through libfuzzer-sys; targets in fuzz/fuzz_targets/, see
# fuzz/README.md).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Builds every target (or the ones named) and runs each for
# SECONDS_PER_TARGET (default 60) with a fixed seed (-seed=1) over its seed
# corpus fuzz/corpus/TARGET, as many targets at once as there are cores.
# Exits nonzero if any target finds a crash, printing the input's path;
# reproduce it with `fuzz/target/<triple>/release/TARGET PATH`.
#
# Builds on stable Rust with the same flags `cargo fuzz build` uses
# (SanitizerCoverage, `--cfg fuzzing`, debug assertions and overflow
# checks); nothing needs installing but a C++ compiler for libFuzzer itself.
#
# Environment:
#   CI=true              fresh scratch corpus per run (new finds are not
#                        kept) and a faster-building, multi-unit build.
#   FUZZ_SANITIZER=address
#                        also build with AddressSanitizer (needs
#                        RUSTC_BOOTSTRAP=1, set here; the default, none, is
#                        plain stable Rust; safe Rust needs ASan little).
#   FUZZ_JOBS=N          targets run at once (default: number of cores).
#   FUZZ_ARGS="..."      extra libFuzzer flags for every target.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

secs=${1:-60}
shift || true
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
    echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]" >&2
    exit 2
fi

if ! command -v cargo >/dev/null; then
    echo "fuzz.sh: cargo not found: install Rust first (https://rustup.rs)" >&2
    exit 1
fi
if ! command -v c++ >/dev/null && ! command -v g++ >/dev/null && ! command -v clang++ >/dev/null; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        echo "fuzz.sh: installing g++ (libFuzzer is C++)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++
    else
        echo "fuzz.sh: a C++ compiler is needed to build libFuzzer (apt-get install g++)" >&2
        exit 1
    fi
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    targets=()
    for f in fuzz/fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi
for t in "${targets[@]}"; do
    if [ ! -f "fuzz/fuzz_targets/$t.rs" ]; then
        echo "fuzz.sh: no target $t (have: $(cd fuzz/fuzz_targets && ls | sed 's/\.rs$//' | tr '\n' ' '))" >&2
        exit 2
    fi
done

ci=false
case "${CI:-}" in true | 1 | yes) ci=true ;; esac
sanitizer=${FUZZ_SANITIZER:-none}
jobs=${FUZZ_JOBS:-$(nproc 2>/dev/null || echo 2)}
triple=$(rustc -vV | sed -n 's/^host: //p')

# The flags of `cargo fuzz build` (cargo-fuzz 0.13, default options).
flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
flags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters"
flags+=" -Cllvm-args=-sanitizer-coverage-pc-table"
flags+=" -Cllvm-args=-sanitizer-coverage-trace-compares"
flags+=" -Cllvm-args=-sanitizer-coverage-stack-depth"
flags+=" -Cllvm-args=-simplifycfg-branch-fold-threshold=0"
flags+=" --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
case "$sanitizer" in
    none) ;;
    address | leak)
        flags+=" -Zsanitizer=$sanitizer"
        export RUSTC_BOOTSTRAP=1
        ;;
    *)
        echo "fuzz.sh: FUZZ_SANITIZER must be none, address or leak" >&2
        exit 2
        ;;
esac
# One codegen unit (cargo-fuzz's choice) runs faster; CI's runs are short,
# so there the build time matters more.
$ci || flags+=" -Ccodegen-units=1"

target_dir=${CARGO_TARGET_DIR:-$root/fuzz/target}
bin_dir=$target_dir/$triple/release
echo "fuzz.sh: building ${#targets[@]} targets (sanitizer: $sanitizer)"
build_start=$(date +%s)
bin_args=()
for t in "${targets[@]}"; do bin_args+=(--bin "$t"); done
RUSTFLAGS="$flags ${RUSTFLAGS:-}" cargo build --manifest-path fuzz/Cargo.toml --release \
    --config 'profile.release.debug="line-tables-only"' \
    --target "$triple" --target-dir "$target_dir" "${bin_args[@]}"
echo "fuzz.sh: built in $(($(date +%s) - build_start)) s"

# Committed seeds are read only; what the fuzzer adds goes to a work
# corpus: kept under fuzz/target between local runs, fresh in CI.
if $ci; then
    work_root=$(mktemp -d)
    trap 'rm -rf "$work_root"' EXIT
else
    work_root=$target_dir/fuzz-corpus
fi
out_root=$target_dir/fuzz-logs
mkdir -p "$out_root"

run_one() {
    local t=$1
    local work=$work_root/$t artifacts=$out_root/$t-artifacts/
    rm -rf "$artifacts" "$out_root/$t.log"
    mkdir -p "$work" "$artifacts" "fuzz/corpus/$t"
    # shellcheck disable=SC2086
    "$bin_dir/$t" -seed=1 -max_total_time="$secs" -max_len=4096 -timeout=30 \
        -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$artifacts" \
        ${FUZZ_ARGS:-} "$work" "fuzz/corpus/$t" >"$out_root/$t.log" 2>&1
}

echo "fuzz.sh: running each target for $secs s, $jobs at a time; logs in $out_root"
run_start=$(date +%s)
failed=()
report() {
    local t=$1
    if [ "$(cat "$out_root/$t.rc")" = 0 ]; then
        local stats
        stats=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$out_root/$t.log" | tail -1 |
            sed 's/^#\([0-9]*\).*cov: \([0-9]*\).*corp: \([0-9]*\).*exec\/s: \([0-9]*\).*/\1 runs, cov \2, corpus \3, \4 exec\/s/')
        echo "  ok    $t: ${stats:-done}"
    else
        failed+=("$t")
        echo "  CRASH $t (exit $(cat "$out_root/$t.rc")): see $out_root/$t.log"
        grep -E -A1 'panicked at' "$out_root/$t.log" | head -2 | sed 's/^/        /'
        grep -E 'ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer)' "$out_root/$t.log" | head -2 | sed 's/^/        /'
        grep -Eo 'Test unit written to .*' "$out_root/$t.log" | sed 's/^Test unit written to /        input: /'
    fi
}
running=()
for t in "${targets[@]}"; do
    while [ "${#running[@]}" -ge "$jobs" ]; do
        sleep 1
        still=()
        for r in "${running[@]}"; do
            if [ -f "$out_root/$r.rc" ]; then report "$r"; else still+=("$r"); fi
        done
        running=("${still[@]}")
    done
    rm -f "$out_root/$t.rc"
    (
        rc=0
        run_one "$t" || rc=$?
        echo "$rc" >"$out_root/$t.rc"
    ) &
    running+=("$t")
done
wait
for r in "${running[@]}"; do report "$r"; done
echo "fuzz.sh: fuzzed for $(($(date +%s) - run_start)) s"

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz.sh: ${#failed[@]} target(s) crashed: ${failed[*]}" >&2
    echo "fuzz.sh: reproduce with $bin_dir/TARGET INPUT; make each a regression test beside the code" >&2
    exit 1
fi
echo "fuzz.sh: ${#targets[@]} targets, no crashes"
