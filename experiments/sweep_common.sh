# Sourced by experiments/*/sweep.sh: `bash experiments/NAME/sweep.sh DIR [smoke]`.
#
# Sets WORKDIR (the sweep's directory, $1), SMOKE (1 for `smoke`, else 0) and
# SMOKE_ARGS: config overrides that log, evaluate and checkpoint at every
# step and evaluate on 64 test examples; with 3 training steps (each script's
# smoke grid) CI runs the sweep and its notebook in seconds per point
# (tests/test_notebooks.py). Runs from the repo root, with the interpreter
# $PYTHON (default python3), so that a venv need not be activated.
set -euo pipefail
if [[ $# -lt 1 || $# -gt 2 || ( $# -eq 2 && "$2" != smoke ) ]]; then
  echo "usage: bash $0 DIR [smoke]" >&2
  exit 2
fi
WORKDIR=$1
SMOKE=0
SMOKE_ARGS=()
if [[ "${2:-}" == smoke ]]; then
  SMOKE=1
  SMOKE_ARGS=(--config.log_every=1 --config.eval_every=3
              --config.checkpoint_every=3 --config.optimizer.warmup_steps=0
              "--config.eval_splits=('test[:64]',)" --config.eval_batch_size=64)
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
