#!/usr/bin/env bash
# Runs the cargo-fuzz targets (fuzz/), each for SECONDS, under libFuzzer's memory limits, and
# prints one line per target: executions, executions per second, corpus size, new coverage.
# New inputs go to a scratch corpus under fuzz/target/ (the committed corpus is only read);
# `make fuzz-cmin` merges what is worth keeping. A crash stops the run with libFuzzer's
# reproducer under fuzz/artifacts/<target>/: fix it, then copy the file into
# fuzz/regressions/<target>/ so that `cargo test` (tests/fuzz_corpus.rs) replays it.
#
#   scripts/fuzz.sh SECONDS [TARGET...]     (default: every target)
#   scripts/fuzz.sh --cmin [TARGET...]      replace fuzz/corpus/<target> by the smallest set of
#                                           inputs (committed corpus, seeds, scratch corpus)
#                                           that covers the same edges
#
# Inputs: fuzz/seeds/<target>/ (well-formed examples, `cargo run --example fuzz_seeds`) and
# fuzz/corpus/<target>/ (what earlier runs found, minimised), both committed.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:?usage: scripts/fuzz.sh SECONDS|--cmin [TARGET...]}
shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list --fuzz-dir fuzz)
fi
# Bounds: one allocation over 2 GiB, or the process over 3 GiB, is a finding. The model
# loader's own bounds (MAX_TENSOR_VALUES, MAX_RGB_SIZE) keep every legitimate path under it.
MALLOC_MB=${FUZZ_MALLOC_MB:-2048}
RSS_MB=${FUZZ_RSS_MB:-3072}

# Release code with debug assertions (-a), so that integer overflow in shape arithmetic
# panics instead of wrapping, and AddressSanitizer (cargo fuzz's default) over the unsafe
# kernels.
FLAGS=(--fuzz-dir fuzz -O -a)
cargo +nightly fuzz build "${FLAGS[@]}"

if [ "$seconds" = --cmin ]; then
  # Edges only (-use_counters=0): hit counts would keep thousands of near-duplicates.
  for t in "${targets[@]}"; do
    merged=fuzz/target/cmin/$t
    rm -rf "$merged" && mkdir -p "$merged" "fuzz/corpus/$t" "fuzz/target/corpus-work/$t"
    cargo +nightly fuzz run "${FLAGS[@]}" "$t" "$merged" "fuzz/corpus/$t" "fuzz/seeds/$t" \
      "fuzz/target/corpus-work/$t" -- -merge=1 -use_counters=0 -rss_limit_mb="$RSS_MB" \
      -malloc_limit_mb="$MALLOC_MB" >"fuzz/target/$t.cmin.log" 2>&1
    rm -f "fuzz/corpus/$t"/*
    cp "$merged"/* "fuzz/corpus/$t/" 2>/dev/null || true
    echo "$t: $(ls "fuzz/corpus/$t" | wc -l) inputs, $(du -sb "fuzz/corpus/$t" | cut -f1) bytes"
  done
  exit 0
fi

status=0
printf '%-18s %12s %10s %8s %8s\n' target executions exec/s corpus cover
for t in "${targets[@]}"; do
  work=fuzz/target/corpus-work/$t
  mkdir -p "$work" "fuzz/artifacts/$t"
  log=fuzz/target/$t.log
  mkdir -p "fuzz/corpus/$t"
  if ! cargo +nightly fuzz run "${FLAGS[@]}" "$t" "$work" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
      -max_total_time="$seconds" -timeout=10 -malloc_limit_mb="$MALLOC_MB" \
      -rss_limit_mb="$RSS_MB" -print_final_stats=1 >"$log" 2>&1; then
    echo "== $t FAILED; the last lines of $log:"
    tail -40 "$log"
    status=1
    continue
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  corpus=$(grep -oE '#[0-9]+.*corp: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+$' || echo '?')
  cover=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+' || echo '?')
  printf '%-18s %12s %10s %8s %8s\n' "$t" "$runs" "$rate" "$corpus" "$cover"
done
exit $status
