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


def test_fit_length():
  np.testing.assert_array_equal(pipeline.fit_length(np.arange(3), 5),
                                [0, 1, 2, 0, 0])
  np.testing.assert_array_equal(pipeline.fit_length(np.arange(9), 4),
                                [0, 1, 2, 3])
