#!/usr/bin/env bash
# MBT fusion_layer 0 (early) to 4 (late) on avmnist/clean, 60 steps of 128.
#   bash experiments/fusion_depth/sweep.sh DIR [smoke]
source "$(dirname "$0")/../sweep_common.sh"
GRID="fusion_layer=0,1,2,3,4"
STEPS=60
[[ $SMOKE == 1 ]] && GRID="fusion_layer=2" STEPS=3
"${PYTHON:-python3}" -m mmjax.sweep \
  --config configs/avmnist.py:clean,grid,fusion=bottleneck,steps=$STEPS \
  --grid "$GRID" --workdir "$WORKDIR" "--config.eval_splits=('test',)" \
  "${SMOKE_ARGS[@]}"
