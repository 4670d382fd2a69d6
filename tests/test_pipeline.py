"""The grain pipeline: epoch reshuffles, sharded batches, exact state restore."""

import ml_collections
import numpy as np
import pytest

from mmjax import parallel
from mmjax.data import pipeline


def source(n=40):
  return [{"image": np.full((2, 2, 1), i, np.uint8),
           "audio": np.arange(i % 7 + 3, dtype=np.int16), "label": i % 10}
          for i in range(n)]


def config(workers=0):
  return ml_collections.ConfigDict(dict(
      batch_size=8, seed=3, modalities=("image", "audio"), audio_length=5,
      data_workers=workers))


def ids(batch):
  return tuple(np.asarray(batch["image"])[:, 0, 0, 0].tolist())


def test_batches_are_sharded_padded_and_masked():
  mesh = parallel.make_mesh(8)
  it = pipeline.TrainIterator(source(), config(), parallel.batch_sharding(mesh))
  batch = next(it)
  assert batch["image"].shape == (8, 2, 2, 1)
  assert batch["audio"].shape == (8, 5) and batch["audio"].dtype == np.int16
  assert batch["image"].sharding.spec == parallel.batch_sharding(mesh).spec
  assert len(batch["image"].addressable_shards) == 8
  assert np.asarray(batch["mask/audio"]).all()


def test_every_epoch_is_a_new_permutation_of_all_examples():
  mesh = parallel.make_mesh(1)
  it = pipeline.TrainIterator(source(), config(), parallel.batch_sharding(mesh))
  epochs = [sum((ids(next(it)) for _ in range(5)), ()) for _ in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(40))
  assert epochs[0] != epochs[1]


@pytest.mark.parametrize("workers", [0, 1])
def test_restored_state_continues_exactly(workers):
  mesh = parallel.make_mesh(1)
  sharding = parallel.batch_sharding(mesh)
  it = pipeline.TrainIterator(source(), config(workers), sharding)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [ids(next(it)) for _ in range(4)]
  fresh = pipeline.TrainIterator(source(), config(workers), sharding)
  fresh.set_state(state)
  assert [ids(next(fresh)) for _ in range(4)] == expected


def test_eval_batches_cover_the_split_once_with_padding():
  mesh = parallel.make_mesh(8)
  batches = list(pipeline.EvalBatches(source(20), config(), 8,
                                       parallel.batch_sharding(mesh)))
  assert len(batches) == 3
  valid = np.concatenate([np.asarray(b["valid"]) for b in batches])
  seen = np.concatenate([np.asarray(b["image"])[:, 0, 0, 0] for b in batches])
  assert valid.sum() == 20 and sorted(seen[valid].tolist()) == list(range(20))


def process_batches(make, process_count, n):
  """n batches of each of `process_count` simulated processes, each
  process's rows concatenated in process order: the global batches."""
  iterators = [iter(make(i, process_count)) for i in range(process_count)]
  return [{k: np.concatenate([np.asarray(b[k]) for b in parts])
           for k in parts[0]}
          for parts in (tuple(next(it) for it in iterators)
                        for _ in range(n))]


@pytest.mark.parametrize("workers", [0, 1])
def test_global_train_batches_do_not_depend_on_the_process_count(workers):
  sharding = parallel.batch_sharding(parallel.make_mesh(1))
  make = lambda i, n: pipeline.TrainIterator(source(), config(workers),
                                             sharding, i, n)
  one, two, four = (process_batches(make, n, 12) for n in (1, 2, 4))
  assert [ids(b) for b in one] == [ids(b) for b in two] == [
      ids(b) for b in four]
  assert len(next(make(1, 2))["label"]) == 4  # each process: its rows only


def test_train_position_resumes_with_another_process_count():
  sharding = parallel.batch_sharding(parallel.make_mesh(1))
  it = pipeline.TrainIterator(source(), config(), sharding)
  for _ in range(7):
    next(it)
  state = it.get_state()
  assert state["process_count"] == 1
  expected = [ids(next(it)) for _ in range(3)]

  def resumed(i, n):
    fresh = pipeline.TrainIterator(source(), config(), sharding, i, n)
    fresh.set_state(state)
    return fresh
  assert [ids(b) for b in process_batches(resumed, 2, 3)] == expected
  legacy = pipeline.TrainIterator(source(), config(), sharding)
  legacy.set_state(state["iterator"])  # checkpoints before the count
  assert [ids(next(legacy)) for _ in range(3)] == expected


@pytest.mark.parametrize("size", [21, 3])
def test_eval_batches_of_processes_are_the_single_process_batches(size):
  sharding = parallel.batch_sharding(parallel.make_mesh(1))
  make = lambda i, n: pipeline.EvalBatches(source(size), config(), 8,
                                           sharding, i, n)
  one = list(make(0, 1))
  for n in (2, 4):
    parts = [list(make(i, n)) for i in range(n)]
    assert {len(p) for p in parts} == {len(one)} == {-(-size // 8)}
    two = process_batches(make, n, len(one))
    for a, b in zip(one, two):
      assert a.keys() == b.keys()
      for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), b[k])
  valid = np.concatenate([np.asarray(b["valid"]) for b in one])
  assert valid.sum() == size


def test_fit_length():
  np.testing.assert_array_equal(pipeline.fit_length(np.arange(3), 5),
                                [0, 1, 2, 0, 0])
  np.testing.assert_array_equal(pipeline.fit_length(np.arange(9), 4),
                                [0, 1, 2, 3])
