#!/usr/bin/env bash
# Plain training, OGM-GE and G-Blending on avmnist (concat fusion, probe
# heads), 150 steps of 128, all with OGM-GE's optimizer (SGD, momentum 0.9):
# fused and unimodal accuracy.
#   bash experiments/imbalance/sweep.sh DIR [smoke]
source "$(dirname "$0")/../sweep_common.sh"
GRID="imbalance=none,ogm_ge,gblend"
STEPS=150
EXTRA=()
if [[ $SMOKE == 1 ]]; then
  GRID="imbalance=ogm_ge,gblend" STEPS=3
  EXTRA=(--config.imbalance.gblend.num_examples=64
         --config.imbalance.gblend.estimate_steps=2)
fi
"${PYTHON:-python3}" -m mmjax.sweep \
  --config configs/avmnist.py:fusion=concat,probe,optimizer=sgd,steps=$STEPS \
  --grid "$GRID" --workdir "$WORKDIR" "--config.eval_splits=('test',)" \
  "${SMOKE_ARGS[@]}" "${EXTRA[@]}"
