#!/usr/bin/env bash
# digits_qa: the generative models against answer-classifier baselines,
# 1500 steps of 64 each (4.8 epochs of the 20,000 training questions).
#   bash experiments/digits_qa/sweep.sh DIR [smoke]
# Flamingo's language model is the model=lm point, trained first, frozen;
# Flamingo itself is a second sweep in DIR/flamingo.
source "$(dirname "$0")/../sweep_common.sh"
GRID="model=prefix,classifier,lm,question_only,image_question,cross_attention"
STEPS=1500
[[ $SMOKE == 1 ]] && GRID="model=prefix,classifier,lm" STEPS=3
run() {
  "${PYTHON:-python3}" -m mmjax.sweep --config configs/digits_qa.py:steps=$STEPS \
    "${SMOKE_ARGS[@]}" "$@"
}
run --grid "$GRID" --workdir "$WORKDIR"
run --grid "model=flamingo lm=$(realpath "$WORKDIR")/model=lm" \
  --workdir "$WORKDIR/flamingo"
