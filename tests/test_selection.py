"""Checkpoint selection (`config.select_best`, mmjax/selection.py): the final
row is the evaluation of the state with the best validation metric."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import configs, evaluate, experiment, selection, train
from mmjax.errors import UsageError

METRIC = "eval/avmnist_val[:64]/classification/loss"


def state_of(value: float) -> dict:
  return {"w": jnp.full((3,), value), "b": jnp.arange(2.0) * value}


def test_keeps_the_best_state_and_knows_it_after_a_restart(tmp_path):
  best = selection.BestCheckpoint(str(tmp_path), "eval/x/acc", "max")
  for step, acc in ((10, 0.5), (20, 0.7), (30, 0.6)):
    best.observe(step, state_of(step), {"eval/x/acc": acc})
  assert best.best_step == 20
  np.testing.assert_array_equal(best.selected(state_of(0))["w"], [20] * 3)
  best.close()
  assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["20"]

  again = selection.BestCheckpoint(str(tmp_path), "eval/x/acc", "max")
  again.observe(40, state_of(40), {"eval/x/acc": 0.65})
  assert again.best_step == 20
  again.observe(50, state_of(50), {"eval/x/acc": 0.8})
  assert again.best_step == 50
  np.testing.assert_array_equal(again.selected(state_of(0))["b"], [0, 50])
  again.close()


def test_min_mode_and_a_missing_metric(tmp_path):
  best = selection.BestCheckpoint(str(tmp_path), "eval/x/loss", "min")
  best.observe(1, state_of(1), {"eval/x/loss": 2.0})
  best.observe(2, state_of(2), {"eval/x/loss": 1.0})
  best.observe(3, state_of(3), {"eval/x/loss": 1.5})
  assert best.best_step == 2
  with pytest.raises(UsageError, match="has no 'eval/x/loss'; it has eval/y"):
    best.observe(4, state_of(4), {"eval/y": 1.0})
  best.close()


def recipe(data_dir, *overrides):
  config = configs.load_config("configs/avmnist.py:fusion=image_only")
  return configs.apply_overrides(config, [
      f"data_dir={data_dir}", "total_steps=8", "batch_size=32",
      "checkpoint_every=2", "log_every=2", "eval_every=2",
      "eval_splits=('val[:64]',)", "eval_batch_size=32",
      "optimizer.warmup_steps=2", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["select_best.metric=eval/avmnist/classification/loss"],
     "not a metric of the run's eval splits"),
    ([f"select_best.metric={METRIC}", "select_best.mode=best"],
     "'select_best.mode' is 'best'"),
])
def test_bad_selection_keys_fail_at_config_time(overrides, message):
  with pytest.raises(UsageError, match=message):
    experiment.check_config(recipe("/nonexistent", *overrides))


def rows_of(workdir):
  return [json.loads(line) for line in
          (workdir / "metrics.jsonl").read_text().splitlines()]


def evals(rows):
  return [r for r in rows if METRIC in r and "wall_time_s" not in r]


def test_the_final_row_evaluates_the_selected_state(tmp_path, avmnist_data_dir,
                                                    monkeypatch):
  # "max" of the loss selects an early evaluation, so that the selected state
  # is not the last one and has to be restored.
  config = recipe(avmnist_data_dir, f"select_best.metric={METRIC}",
                  "select_best.mode=max")
  _, final = train.train(config, str(tmp_path / "whole"))
  rows = rows_of(tmp_path / "whole")
  curve = evals(rows)
  assert [r["step"] for r in curve] == [2, 4, 6, 8]
  worst = max(curve, key=lambda r: r[METRIC])
  assert worst["step"] < 8
  assert final["selected_step"] == worst["step"]
  assert rows[-1]["step"] == 8 and rows[-1]["selected_step"] == worst["step"]
  for key, value in worst.items():  # the restored state evaluates the same
    if key.startswith("eval/"):
      assert final[key] == pytest.approx(value, abs=1e-6), key
  # `mmjax.evaluate` evaluates the selected state too.
  again = evaluate.evaluate(config, str(tmp_path / "whole"))
  assert again["step"] == worst["step"]
  assert again[METRIC] == pytest.approx(final[METRIC], abs=1e-6)

  # Stopped after the step-4 checkpoint, before its evaluation: the same
  # command evaluates step 4 first and ends with the same selection.
  calls = []
  original = experiment.Experiment.evaluate

  def interrupted(self, state):
    calls.append(int(state.step))
    if len(calls) == 2:
      raise KeyboardInterrupt
    return original(self, state)

  monkeypatch.setattr(experiment.Experiment, "evaluate", interrupted)
  with pytest.raises(KeyboardInterrupt):
    train.train(config, str(tmp_path / "stopped"))
  monkeypatch.setattr(experiment.Experiment, "evaluate", original)
  _, resumed = train.train(config, str(tmp_path / "stopped"))
  again = rows_of(tmp_path / "stopped")
  assert [r["step"] for r in evals(again)] == [2, 4, 6, 8]
  assert resumed["selected_step"] == final["selected_step"]
  for key, value in final.items():
    if key.startswith("eval/"):
      assert resumed[key] == pytest.approx(value, abs=1e-6), key


def test_without_a_metric_the_final_row_is_the_last_state(tmp_path,
                                                          avmnist_data_dir):
  config = recipe(avmnist_data_dir, "total_steps=4")
  _, final = train.train(config, str(tmp_path))
  assert "selected_step" not in final
  assert not (tmp_path / "best").exists()
  assert [r["step"] for r in rows_of(tmp_path) if METRIC in r] == [2, 4]
