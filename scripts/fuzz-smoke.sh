#!/usr/bin/env bash
# Runs every fuzz target for a few seconds over its seed corpus (CI's smoke run).
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the pinned stable toolchain accept them.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${FUZZ_SECONDS:-5}"
export RUSTC_BOOTSTRAP=1
for target in $(cargo fuzz list); do
  mkdir -p "corpus/$target"
  # Work on a copy so the run does not grow the committed seed corpus.
  work=$(mktemp -d)
  cp -r "corpus/$target/." "$work/"
  echo "fuzz: $target for ${secs}s"
  status=0
  cargo fuzz run --sanitizer none "$target" "$work" -- -max_total_time="$secs" -print_final_stats=0 \
    > "$work.log" 2>&1 || status=$?
  grep -E "^(Done|==|SUMMARY|thread)|panicked" "$work.log" || true
  if [ "$status" -ne 0 ]; then
    echo "fuzz: $target FAILED (exit $status); the input is in fuzz/artifacts/$target" >&2
    tail -40 "$work.log" >&2
    exit 1
  fi
  rm -f "$work.log"
  rm -rf "$work"
done
echo "fuzz: all targets ran clean"
