"""The run log (mmjax/metric_writers.py) and the results module it writes for
(mmjax/results.py)."""

import json

import pytest

from mmjax import metric_writers, results


def rows_of(workdir):
  return results.read_jsonl(workdir / "metrics.jsonl")


def test_rows_config_and_tensorboard(tmp_path):
  writer = metric_writers.MetricWriter(tmp_path, 10, {"seed": 3, "t": (1, 2)})
  writer.write(5, {"train/loss": 1.5, "name": "x"})
  writer.write(10, {"eval/a/classification/accuracy": 0.5, "wall_time_s": 2.0})
  writer.close()
  assert json.loads((tmp_path / "config.json").read_text()) == {
      "seed": 3, "t": [1, 2]}
  assert rows_of(tmp_path) == [
      {"step": 5, "train/loss": 1.5, "name": "x"},
      {"step": 10, "eval/a/classification/accuracy": 0.5, "wall_time_s": 2.0}]
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents*"))
  assert writer.has_final_row(10) and not writer.has_final_row(20)
  assert not list(tmp_path.glob("*.tmp"))


def test_resume_drops_rows_after_the_checkpoint_and_a_torn_line(tmp_path):
  writer = metric_writers.MetricWriter(tmp_path, 30)
  for step in (10, 20, 30):
    writer.write(step, {"train/loss": float(step)})
  writer.close()
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 31, "train/lo')  # a run killed mid-write
  assert [r["step"] for r in rows_of(tmp_path)] == [10, 20, 30]
  resumed = metric_writers.MetricWriter(tmp_path, 30)
  resumed.resume(20)
  resumed.write(30, {"train/loss": 3.0})
  resumed.close()
  assert [(r["step"], r["train/loss"]) for r in rows_of(tmp_path)] == [
      (10, 10.0), (20, 20.0), (30, 3.0)]


def test_finished_run_needs_the_final_row_and_its_checkpoint(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(
      json.dumps({"step": 10, "wall_time_s": 1.0}) + "\n")
  assert not results.is_finished(tmp_path, 10)
  (tmp_path / "checkpoints" / "10").mkdir(parents=True)
  assert results.is_finished(tmp_path, 10)
  assert not results.is_finished(tmp_path, 20)


def test_metric_names():
  assert results.eval_name("wds:/data/cc3m/{split}/{0000..0331}.tar",
                           "val") == "cc3m_val"
  assert results.eval_name("wds:shards/*.tar", "test") == "shards"
  assert results.eval_name("wds:{a,b}.tar", "test") == "wds"
  assert results.eval_name("tfds:coco_captions/2014:1.1.0", "test") == (
      "coco_captions_2014")
  assert results.metric_name("avmnist/clean", "val", "classification",
                             "accuracy") == (
      "eval/avmnist_clean_val/classification/accuracy")


def test_write_atomically_replaces_whole(tmp_path):
  path = tmp_path / "a.json"
  results.write_atomically(path, "old")
  results.write_atomically(path, "new")
  assert path.read_text() == "new" and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("value, spec, text", [(None, ".0f", "-"),
                                                (12.345, ".1f", "12.3")])
def test_cell(value, spec, text):
  assert results.cell(value, spec) == text
