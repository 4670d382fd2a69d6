#!/usr/bin/env bash
# Every fusion on AV-MNIST (MultiBench protocol), 3 seeds, one epoch (430 steps of 128).
#   bash experiments/avmnist_fusion/sweep.sh DIR [smoke]
source "$(dirname "$0")/../sweep_common.sh"
FUSIONS=image_only,audio_only,early,concat,late,weighted,hybrid,tensor,low_rank_tensor
FUSIONS=$FUSIONS,cross_attention,coattention,mult,perceiver,bottleneck
GRID="seed=0,1,2 fusion=$FUSIONS"  # seed slowest: an interrupted sweep has whole seeds
STEPS=430
[[ $SMOKE == 1 ]] && GRID="seed=0 fusion=late" STEPS=3
"${PYTHON:-python3}" -m mmjax.sweep --config configs/avmnist.py:grid,steps=$STEPS --grid "$GRID" \
  --workdir "$WORKDIR" "--config.eval_splits=('test',)" "${SMOKE_ARGS[@]}"
