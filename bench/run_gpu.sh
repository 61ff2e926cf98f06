#!/usr/bin/env bash
# Run bench scripts one after another on the GPU machine, each under its own timeout, and collect
# their JSON and logs under $OUT; finish with one compact summary of every JSON (the caller sees
# only the tail of the output, so the summary is what must fit).
#
#   bash bench/run_gpu.sh <name>[@<tag>]:<timeout_s>[:<script args>] ...
#
#   CRUCIBLE_COMMIT=$(git rev-parse --short HEAD) OUT=/tmp/out bash bench/run_gpu.sh \
#       "sft_vs_trl@135m:200:--shapes smollm2-135m" "full_ft_mfu:150"
#
# Entry <name> runs `timeout <t> python bench/<name>.py <args> --out $OUT/<name>[-<tag>].json`,
# logging to $OUT/<name>[-<tag>].log; a tag lets one script run twice with different arguments.
# A failed or timed-out entry does not stop the others; the exit code is the number that failed.
# Args are split at whitespace (so one flag value holds no space; ';' and '=' are fine, e.g.
# --ours-variants compiled=train.compile=true;bf16w=train.mixed_precision=bf16_weights). Give a
# script that takes --time-budget one ~20 s below the entry's timeout so it prints its table itself.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-bench_out}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
if [ $# -eq 0 ]; then
    sed -n '5,7p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi

set -f  # entry args are word-split into flags but never globbed (a '*' or '?' in an override stays literal)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=disabled
failed=0
status_lines=()
for entry in "$@"; do
    IFS=':' read -r name timeout_s args <<<"$entry"
    script="${name%@*}"
    label="$script"
    [ "$name" != "$script" ] && label="$script-${name#*@}"
    if [ ! -f "bench/$script.py" ] || ! [[ "$timeout_s" =~ ^[0-9]+$ ]]; then
        status_lines+=("$label: bad entry '$entry' (want <name>[@tag]:<timeout_s>[:args], bench/<name>.py must exist)")
        failed=$((failed + 1))
        continue
    fi
    echo "=== $label (timeout ${timeout_s}s): python bench/$script.py $args"
    start=$(date +%s)
    # shellcheck disable=SC2086  # args are word-split on purpose: they are the script's flags
    timeout --kill-after=20 "$timeout_s" "$PYTHON" "bench/$script.py" $args --out "$OUT/$label.json" >"$OUT/$label.log" 2>&1
    rc=$?
    took=$(($(date +%s) - start))
    case $rc in
        0) verdict="ok" ;;
        124 | 137) verdict="TIMEOUT after ${timeout_s}s" ;;
        *) verdict="FAILED rc=$rc" ;;
    esac
    [ $rc -ne 0 ] && failed=$((failed + 1))
    status_lines+=("$label: $verdict (${took}s)")
    echo "--- $label: $verdict (${took}s)"
    if [ $rc -ne 0 ]; then  # the reason, without the whole log
        grep -v '^\s*$' "$OUT/$label.log" | tail -n 6 | cut -c1-240 | sed 's/^/    /'
    fi
done

echo
echo "=== summary ($(date -u '+%Y-%m-%d %H:%M UTC'), commit ${CRUCIBLE_COMMIT:-unknown})"
printf '%s\n' "${status_lines[@]}"
jsons=()
for entry in "$@"; do
    name="${entry%%:*}"
    script="${name%@*}"
    label="$script"
    [ "$name" != "$script" ] && label="$script-${name#*@}"
    [ -f "$OUT/$label.json" ] && jsons+=("$OUT/$label.json")
done
if [ ${#jsons[@]} -gt 0 ]; then
    "$PYTHON" bench/charts.py summary "${jsons[@]}" || echo "(summary failed; the JSON files are in $OUT)"
fi
exit $failed
