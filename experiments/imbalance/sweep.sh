#!/usr/bin/env bash
# Plain training, OGM-GE and G-Blending on avmnist (concat fusion, probe
# heads), 150 steps of 128: fused and unimodal accuracy.
#   bash experiments/imbalance/sweep.sh DIR [smoke]
source "$(dirname "$0")/../sweep_common.sh"
GRID="imbalance=none,ogm_ge,gblend"
STEPS=150
[[ $SMOKE == 1 ]] && GRID="imbalance=ogm_ge,gblend" STEPS=3
"${PYTHON:-python3}" -m mmjax.sweep --config configs/avmnist.py:fusion=concat,probe,steps=$STEPS \
  --grid "$GRID" --workdir "$WORKDIR" "--config.eval_splits=('test',)" \
  "${SMOKE_ARGS[@]}"
