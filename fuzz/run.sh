#!/usr/bin/env bash
# Fuzz one target: fuzz/run.sh TARGET [SECONDS]   (docs/DEVELOPMENT.md, "Fuzzing")
# Optimised with debug assertions (-O -a), so an overflow is a crash; prints the executions.
set -euo pipefail
target=${1:?usage: fuzz/run.sh TARGET [SECONDS]}
seconds=${2:-60}
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
[ -f "fuzz_targets/$target.rs" ] || { echo "no target $target; targets: $(ls fuzz_targets | sed 's/\.rs$//' | tr '\n' ' ')" >&2; exit 2; }
case $target in
  format_*) max_len=65536 ;;
  embedded_request) max_len=16384 ;;
  *) max_len=4096 ;;
esac
args=(-max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len="$max_len" -print_final_stats=1)
[ -f "dicts/$target.dict" ] && args+=(-dict="dicts/$target.dict")
mkdir -p "corpus/$target"
[ -d "seeds/$target" ] && seeds=("seeds/$target") || seeds=()
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo +nightly fuzz run -O -a "$target" "corpus/$target" "${seeds[@]}" -- "${args[@]}" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
grep -m1 'stat::number_of_executed_units' "$log" || true
exit "$rc"
