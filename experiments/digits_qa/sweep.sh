#!/usr/bin/env bash
# digits_qa: the generative models against answer-classifier baselines.
#   bash experiments/digits_qa/sweep.sh DIR [smoke]
# 1. DIR: 1500 steps of 64 each (4.8 epochs of the 20,000 training
#    questions) over the image LeNet's 7x7 grid of tokens.
# 2. DIR/flamingo: Flamingo over the frozen model=lm point of 1.
# 3. DIR/cells (and DIR/cells/registers): the large build (60,000 training
#    questions), 6000 steps of 64, over the cell tokens of a locked MNIST
#    LeNet (configs/mnist.py, trained first in DIR/mnist).
source "$(dirname "$0")/../sweep_common.sh"
GRID="model=prefix,classifier,lm,question_only,image_question,cross_attention"
STEPS=1500
CELLS="data=large,steps=6000"
CELL_GRID="model=classifier,prefix,cross_attention"
MNIST=configs/mnist.py
if [[ $SMOKE == 1 ]]; then
  GRID="model=prefix,lm" STEPS=3
  CELLS="steps=3" CELL_GRID="model=classifier" MNIST=configs/mnist.py:smoke
fi
PY="${PYTHON:-python3}"
run() {  # run CONFIG_ARGS SWEEP_ARGS...
  local args=$1
  shift
  "$PY" -m mmjax.sweep --config "configs/digits_qa.py:$args" \
    "${SMOKE_ARGS[@]}" "$@"
}
run "steps=$STEPS" --grid "$GRID" --workdir "$WORKDIR"
run "steps=$STEPS" --grid "model=flamingo lm=$(realpath "$WORKDIR")/model=lm" \
  --workdir "$WORKDIR/flamingo"
"$PY" -m mmjax.train --config "$MNIST" --workdir "$WORKDIR/mnist" \
  >> "$WORKDIR/mnist.log" 2>&1
CELLS="image=cells,cells=$(realpath "$WORKDIR")/mnist,$CELLS"
run "$CELLS" --grid "$CELL_GRID" --workdir "$WORKDIR/cells"
run "$CELLS" --grid "model=cross_attention registers=1" \
  --workdir "$WORKDIR/cells/registers"
