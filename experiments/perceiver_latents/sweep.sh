#!/usr/bin/env bash
# Perceiver resampler latents 1 to 64 on avmnist, 60 steps of 128.
#   bash experiments/perceiver_latents/sweep.sh DIR [smoke]
source "$(dirname "$0")/../sweep_common.sh"
GRID="latents=1,4,16,64"
STEPS=60
[[ $SMOKE == 1 ]] && GRID="latents=4" STEPS=3
"${PYTHON:-python3}" -m mmjax.sweep \
  --config configs/avmnist.py:grid,fusion=perceiver,steps=$STEPS \
  --grid "$GRID" --workdir "$WORKDIR" "--config.eval_splits=('test',)" \
  "--config.evaluators={'classification': {}}" "${SMOKE_ARGS[@]}"
