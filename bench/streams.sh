#!/usr/bin/env bash
# Run several bench/run_gpu.sh streams at once, each on its own GPUs, from a plan file; pack every
# stream's JSON and logs into one archive (the device returns only a few files) and print each
# stream's summary last.
#
#   OUT=/tmp/out CRUCIBLE_COMMIT=$(git rev-parse --short HEAD) bash bench/streams.sh plan.txt
#
# plan.txt, one run_gpu.sh entry per line, prefixed by the CUDA_VISIBLE_DEVICES of its stream;
# entries with the same prefix run one after another, different prefixes in parallel. A line may set
# environment variables for its entry before the entry (KEY=VALUE ... then the entry):
#
#   0|export_gpu:200:--parts exports
#   1|fp8_gpu:540:--profile
#   2,3|parallel_gpu:500
#   1|TORCH_LOGS=recompiles full_ft_mfu@compiled:300:--sides ours
#
# Blank lines and lines starting with '#' are ignored. Output: $OUT/results.tgz holding, per stream,
# results/<gpus>/{stream.log,*.json,*.log,*.png}. The exit code is the number of failed streams.
set -uo pipefail

cd "$(dirname "$0")/.."
plan="${1:?usage: bench/streams.sh plan.txt}"
OUT="${OUT:-bench_out}"
mkdir -p "$OUT/results"

mapfile -t gpus < <(grep -v '^\s*\(#\|$\)' "$plan" | cut -d'|' -f1 | awk '!seen[$0]++')
# streams share the host's cores: without a cap every process starts one OpenMP thread per core and
# CPU-side work (export, tokenization, launch-bound steps) slows down unpredictably
threads=$(( $(nproc) / ${#gpus[@]} ))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}"
pids=()
for g in "${gpus[@]}"; do
    dir="$OUT/results/${g//,/-}"
    mkdir -p "$dir"
    (
        rc=0
        while IFS='|' read -r prefix line; do
            [ "$prefix" = "$g" ] || continue
            envs=()
            while [[ "$line" =~ ^([A-Za-z_][A-Za-z0-9_]*=[^ ]*)\ +(.*)$ ]]; do
                envs+=("${BASH_REMATCH[1]}")
                line="${BASH_REMATCH[2]}"
            done
            env "${envs[@]}" CUDA_VISIBLE_DEVICES="$g" OUT="$dir" bash bench/run_gpu.sh "$line" || rc=1
        done < <(grep -v '^\s*\(#\|$\)' "$plan")
        exit $rc
    ) >"$dir/stream.log" 2>&1 &
    pids+=($!)
done

failed=0
for pid in "${pids[@]}"; do
    wait "$pid" || failed=$((failed + 1))
done
tar czf "$OUT/results.tgz" -C "$OUT" results
for g in "${gpus[@]}"; do
    echo "##### GPUs $g"
    # each entry's verdict, then the summaries run_gpu.sh prints after '=== summary'
    log="$OUT/results/${g//,/-}/stream.log"
    grep -E '^--- ' "$log" | cut -c1-200
    awk '/^=== summary/{on=1} on' "$log" | grep -v '^\s*$' | grep -v '^=== summary' | tail -n "${STREAM_TAIL:-25}" | cut -c1-200
done
rm -rf "$OUT/results"  # everything is in the archive: the device returns only a few files
exit $failed
