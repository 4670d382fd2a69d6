#!/usr/bin/env bash
# Every fusion in FUSIONS on `avmnist` with one budget (200 steps of 128, the
# LeNets giving 9 tokens per modality), evaluated on test with each modality
# removed too; writes results.md next to this script.
# Usage: bash experiments/fusion_zoo/run.sh RUNS_DIR ["SEEDS"] [-- --config.KEY=VALUE ...]
set -euo pipefail
here=$(dirname "$0")
runs=${1:?usage: run.sh RUNS_DIR [SEEDS] [-- overrides]}; seeds=${2:-0}; shift 2 || shift $#
[[ ${1:-} == "--" ]] && shift
fusions=$(python -c "from mmjax.models.fusion import FUSIONS; print(' '.join(FUSIONS))")
ARGS=grid,steps=200 bash "$here/../avmnist_fusion/run.sh" "$runs" "$seeds" $fusions \
  -- --config.eval_splits=test "$@"
python "$here/../avmnist_fusion/summarize.py" "$runs" > "$here/results.md"
cat "$here/results.md"
