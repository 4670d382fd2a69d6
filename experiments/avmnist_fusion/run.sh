#!/usr/bin/env bash
# Trains every AV-MNIST fusion with the default recipe for the given seeds and
# writes the summary table.
# Usage: [ARGS=a,b=c] bash experiments/avmnist_fusion/run.sh RUNS_DIR "SEEDS" [FUSION ...] [-- --config.KEY=VALUE ...]
#   e.g. bash experiments/avmnist_fusion/run.sh /tmp/avmnist_runs "0 1 2"
# ARGS are extra configs/avmnist.py arguments for every run (e.g. grid,steps=200).
# A finished run is skipped; an interrupted one resumes.
set -euo pipefail
runs=${1:?usage: run.sh RUNS_DIR "SEEDS" [FUSION ...] [-- overrides]}; seeds=${2:-0}; shift 2 || shift $#
fusions=(); while [[ $# -gt 0 && $1 != "--" ]]; do fusions+=("$1"); shift; done
[[ ${1:-} == "--" ]] && shift
[[ ${#fusions[@]} -gt 0 ]] || fusions=(image_only audio_only early concat late weighted)
mkdir -p "$runs"
for seed in $seeds; do
  for fusion in "${fusions[@]}"; do
    dir="$runs/${fusion}_s${seed}"
    if [[ -f $dir/metrics.jsonl ]] && grep -q wall_time_s "$dir/metrics.jsonl"; then continue; fi
    echo "$(date +%T) $fusion seed $seed"
    python -m mmjax.train --config "configs/avmnist.py:fusion=$fusion,seed=$seed${ARGS:+,$ARGS}" \
      --workdir "$dir" "$@" > "$dir.log" 2>&1 || echo "  failed: see $dir.log"
  done
done
python experiments/avmnist_fusion/summarize.py "$runs"
