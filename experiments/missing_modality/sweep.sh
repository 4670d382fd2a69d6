#!/usr/bin/env bash
# Test-time missing rate and corruption per modality, for five fusions trained
# with and without modality dropout, on avmnist/clean, 60 steps of 128.
#   bash experiments/missing_modality/sweep.sh DIR [smoke]
source "$(dirname "$0")/../sweep_common.sh"
GRID="fusion=late,concat,perceiver,bottleneck,coattention drop=0.0,0.3"
STEPS=60
[[ $SMOKE == 1 ]] && GRID="fusion=late drop=0.3" STEPS=3
EVALUATORS="{'classification': {},
  'missing_modality': {'rates': (0.0, 0.25, 0.5, 0.75, 1.0)},
  'robustness': {'corruptions': {
      'image': {'gaussian_noise': (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
                'occlusion': (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)},
      'audio': {'awgn': (0.0, 1.0, 2.0, 4.0, 8.0)}}}}"
"${PYTHON:-python3}" -m mmjax.sweep --config configs/avmnist.py:clean,grid,steps=$STEPS \
  --grid "$GRID" --workdir "$WORKDIR" "--config.eval_splits=('test[:2000]',)" \
  "--config.evaluators=$EVALUATORS" "${SMOKE_ARGS[@]}"
