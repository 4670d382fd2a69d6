#!/usr/bin/env bash
# Softmax (CLIP) against sigmoid (SigLIP) across batch sizes on FSDD x MNIST,
# each run seeing the same 12,800 pairs; zero-shot digit accuracy on test.
#   bash experiments/contrastive_batch/sweep.sh DIR [smoke]
source "$(dirname "$0")/../sweep_common.sh"
GRID="objective=softmax,sigmoid batch=32,64,128,256"
EXAMPLES=12800
[[ $SMOKE == 1 ]] && GRID="objective=sigmoid batch=8" EXAMPLES=24
"${PYTHON:-python3}" -m mmjax.sweep --config configs/av_contrastive.py:examples=$EXAMPLES \
  --grid "$GRID" --workdir "$WORKDIR" \
  "--config.evaluators={'zero_shot': {'modality': 'audio', 'prototypes_from': 'image'}}" \
  "${SMOKE_ARGS[@]}"
