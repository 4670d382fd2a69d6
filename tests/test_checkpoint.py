"""mmjax.checkpoint with real orbax checkpoints: falling back from a corrupt
step, a checkpoint of another model, the legacy `imbalance` field, failed
saves."""

import hashlib
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax.checkpoint._src.path import atomicity

from mmjax import checkpoint
from mmjax.errors import UsageError


@flax.struct.dataclass
class State:
  step: jnp.ndarray
  params: dict
  opt_state: optax.OptState
  method_state: dict = flax.struct.field(default_factory=dict)


@flax.struct.dataclass
class OldState:  # before `imbalance` was renamed `method_state`
  step: jnp.ndarray
  params: dict
  opt_state: optax.OptState
  imbalance: dict = flax.struct.field(default_factory=dict)


TX = optax.adam(1e-3)


def make_state(step: int, shape=(3, 4), cls=State, **extra):
  params = {"dense": {"kernel": jnp.full(shape, float(step)),
                      "bias": jnp.zeros(shape[-1])}}
  return cls(jnp.int32(step), params, TX.init(params), **extra)


def save_steps(workdir, steps, keep=5, **extra):
  ckpt = checkpoint.Checkpointer(str(workdir), keep)
  for s in steps:
    ckpt.save(s, make_state(s, **extra), {"position": s})
  ckpt.close()


def corrupt(step_dir, how: str):
  """Damages a checkpoint's array data files (the OCDBT data under d/)."""
  files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files
  for p in files:
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 3] if how == "truncate"
                  else bytes(255 - b for b in data))


def snapshot(root) -> dict:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def opened(workdir, keep=5):
  warnings = []
  return checkpoint.Checkpointer(str(workdir), keep, warn=warnings.append), warnings


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_corrupt_latest_falls_back_to_the_older_step(tmp_path, how):
  save_steps(tmp_path, [1, 2])
  corrupt(tmp_path / "checkpoints" / "2", how)
  before = snapshot(tmp_path / "checkpoints" / "2")
  ckpt, warnings = opened(tmp_path)
  assert ckpt.latest_step() == 2
  state, data_state = ckpt.restore(make_state(0))
  assert ckpt.restored_step == 1 and int(state.step) == 1
  assert data_state == {"position": 1}
  np.testing.assert_array_equal(state.params["dense"]["kernel"],
                                np.ones((3, 4)))
  assert len(warnings) == 1
  assert "step 2" in warnings[0] and "trying step 1" in warnings[0]
  assert "\n" not in warnings[0]
  assert ckpt.latest_step() == 1  # the unrestorable step is left out
  ckpt.close()
  assert snapshot(tmp_path / "checkpoints" / "2") == before


def test_default_warning_goes_to_stderr(tmp_path, capsys):
  save_steps(tmp_path, [1, 2])
  corrupt(tmp_path / "checkpoints" / "2", "truncate")
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.restore(make_state(0))
  ckpt.close()
  err = capsys.readouterr().err
  assert err.startswith("warning: checkpoint step 2 in ") and "trying step 1" in err


def test_after_a_fallback_saves_go_on_and_never_delete_the_corrupt_step(
    tmp_path):
  save_steps(tmp_path, [2, 4], keep=2)
  corrupt(tmp_path / "checkpoints" / "4", "truncate")
  before = snapshot(tmp_path / "checkpoints" / "4")
  ckpt, _ = opened(tmp_path, keep=2)
  ckpt.restore(make_state(0))
  assert ckpt.restored_step == 2
  # Without forgetting step 4, orbax would skip saving step 3 (below its
  # latest step) and later delete step 4 as one of the oldest.
  for s in (3, 5, 6, 7):
    ckpt.save(s, make_state(s), {"position": s})
  ckpt.close()
  names = sorted(os.listdir(tmp_path / "checkpoints"))
  assert {"4", "6", "7"} <= set(names) and not {"2", "3", "5"} & set(names)
  assert snapshot(tmp_path / "checkpoints" / "4") == before
  # A later run knows step 4 is unrestorable (unrestorable.json) and keeps it.
  ckpt, warnings = opened(tmp_path, keep=2)
  assert ckpt.latest_step() == 7
  ckpt.restore(make_state(0))
  assert ckpt.restored_step == 7 and not warnings
  for s in (8, 9, 10):
    ckpt.save(s, make_state(s), {"position": s})
  ckpt.close()
  assert snapshot(tmp_path / "checkpoints" / "4") == before


def test_saving_the_corrupt_steps_number_again_renames_it_aside(tmp_path):
  save_steps(tmp_path, [1, 2])
  corrupt(tmp_path / "checkpoints" / "2", "garbage")
  before = snapshot(tmp_path / "checkpoints" / "2")
  ckpt, warnings = opened(tmp_path)
  ckpt.restore(make_state(0))
  ckpt.save(2, make_state(22), {"position": 22})
  ckpt.close()
  assert "2.unrestorable" in warnings[-1]
  assert snapshot(tmp_path / "checkpoints" / "2.unrestorable") == before
  ckpt, warnings = opened(tmp_path)
  state, data_state = ckpt.restore(make_state(0))
  assert ckpt.restored_step == 2 and int(state.step) == 22 and not warnings
  assert data_state == {"position": 22}
  ckpt.close()


def test_nothing_restorable_is_a_usage_error_and_changes_nothing(tmp_path):
  save_steps(tmp_path, [1, 2])
  corrupt(tmp_path / "checkpoints" / "1", "garbage")
  corrupt(tmp_path / "checkpoints" / "2", "truncate")
  before = snapshot(tmp_path)
  ckpt, warnings = opened(tmp_path)
  with pytest.raises(UsageError) as e:
    ckpt.restore(make_state(0))
  ckpt.close()
  message = str(e.value)
  assert str(tmp_path / "checkpoints") in message
  assert "tried steps 2, 1" in message and "\n" not in message
  assert len(warnings) == 2 and "no older step" in warnings[1]
  assert snapshot(tmp_path) == before
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


def test_missing_files_fall_back_too(tmp_path):
  save_steps(tmp_path, [1, 2])
  (tmp_path / "checkpoints" / "2" / "state" / "_METADATA").unlink()
  (tmp_path / "checkpoints" / "2" / "data" / "metadata").write_text("{oops")
  ckpt, warnings = opened(tmp_path)
  ckpt.restore(make_state(0))
  ckpt.close()
  assert ckpt.restored_step == 1 and "step 2" in warnings[0]


def test_an_explicit_step_does_not_fall_back(tmp_path):
  save_steps(tmp_path, [1, 2])
  corrupt(tmp_path / "checkpoints" / "2", "truncate")
  ckpt, _ = opened(tmp_path)
  with pytest.raises(UsageError, match="tried step 2;"):
    ckpt.restore(make_state(0), step=2)
  state, _ = ckpt.restore(make_state(0), step=1)
  ckpt.close()
  assert int(state.step) == 1


def test_no_checkpoints_is_a_usage_error(tmp_path):
  ckpt, _ = opened(tmp_path)
  with pytest.raises(UsageError, match="no checkpoints in"):
    ckpt.restore(make_state(0))
  ckpt.close()


def test_a_checkpoint_of_another_model_names_the_parameter(tmp_path):
  save_steps(tmp_path, [1])
  before = snapshot(tmp_path)
  ckpt, warnings = opened(tmp_path)
  with pytest.raises(UsageError) as e:
    ckpt.restore(make_state(0, shape=(3, 5)))
  message = str(e.value)
  assert "different model" in message and str(ckpt.directory) in message
  assert "params.dense.bias" in message  # the first leaf in tree order
  assert "(4,)" in message and "(5,)" in message
  assert not warnings  # not taken for a corrupt checkpoint

  class_with_more = flax.struct.dataclass(type("More", (), {
      "__annotations__": {"step": jnp.ndarray, "params": dict,
                          "opt_state": optax.OptState, "method_state": dict,
                          "extra": jnp.ndarray}}))
  more = class_with_more(jnp.int32(0), make_state(0).params,
                         make_state(0).opt_state, {}, jnp.zeros(2))
  with pytest.raises(UsageError, match="this model has extra .*does not store"):
    ckpt.restore(more)
  params = make_state(0).params
  params["dense"] = {"kernel": params["dense"]["kernel"]}
  fewer = State(jnp.int32(0), params, TX.init(params))
  with pytest.raises(UsageError,
                     match="stores opt_state.0.mu.dense.bias .*does not have"):
    ckpt.restore(fewer)
  ckpt.close()
  assert snapshot(tmp_path) == before


@pytest.mark.parametrize("value", [{"weights": np.arange(3, dtype=np.float32)},
                                   {}], ids=["weights", "empty"])
def test_legacy_imbalance_restores_into_method_state(tmp_path, value):
  stored = {k: jnp.asarray(v) for k, v in value.items()}
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(3, make_state(3, cls=OldState, imbalance=stored), {"position": 3})
  ckpt.close()
  expected = {k: jnp.zeros_like(v) for k, v in stored.items()}
  ckpt, warnings = opened(tmp_path)
  state, data_state = ckpt.restore(make_state(0, method_state=expected))
  ckpt.close()
  assert isinstance(state, State) and not warnings
  assert int(state.step) == 3 and data_state == {"position": 3}
  assert set(state.method_state) == set(value)
  for k, v in value.items():
    np.testing.assert_array_equal(state.method_state[k], v)
  np.testing.assert_array_equal(state.params["dense"]["kernel"],
                                np.full((3, 4), 3.0))
  np.testing.assert_array_equal(state.opt_state[0].mu["dense"]["kernel"],
                                np.zeros((3, 4)))
  # The same checkpoint still restores into the old class.
  ckpt, _ = opened(tmp_path)
  old, _ = ckpt.restore(make_state(0, cls=OldState, imbalance=expected))
  ckpt.close()
  assert set(old.imbalance) == set(value)


def test_legacy_rename_still_checks_shapes(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(1, make_state(1, cls=OldState, imbalance={"weights": jnp.ones(3)}),
            {})
  ckpt.close()
  ckpt, _ = opened(tmp_path)
  with pytest.raises(UsageError, match=r"method_state.weights with shape \(3,\) "
                     r"but this model expects \(2,\)"):
    ckpt.restore(make_state(0, method_state={"weights": jnp.ones(2)}))
  ckpt.close()


def fail_commits(monkeypatch):
  async def finalize(*args, **kwargs):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)


@pytest.mark.parametrize("surfaces_at", ["save", "wait", "close"])
def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                     surfaces_at):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1)
  ckpt.save(1, make_state(1), {"position": 1})
  ckpt.wait()
  fail_commits(monkeypatch)
  ckpt.save(2, make_state(2), {"position": 2})  # asynchronous: no error yet
  with pytest.raises(UsageError) as e:
    if surfaces_at == "save":
      ckpt.save(3, make_state(3), {"position": 3})
    elif surfaces_at == "wait":
      ckpt.wait()
    else:
      ckpt.close()
  message = str(e.value)
  assert message.startswith("checkpoint save at step 2 failed: OSError: ")
  assert "No space left on device" in message and "\n" not in message
  assert message.endswith(
      f"the latest good checkpoint is step 1 in {tmp_path / 'checkpoints'}")
  monkeypatch.undo()
  assert ckpt.latest_step() == 1
  if surfaces_at != "close":
    ckpt.wait()  # reported once
    ckpt.close()
  assert "1" in os.listdir(tmp_path / "checkpoints")
  ckpt, warnings = opened(tmp_path, keep=1)
  state, data_state = ckpt.restore(make_state(0))
  ckpt.close()
  assert int(state.step) == 1 and data_state == {"position": 1} and not warnings


def test_a_save_failing_at_once_is_a_usage_error(tmp_path, monkeypatch):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(5, make_state(5), {"position": 5})
  ckpt.wait()

  def broken(*args, **kwargs):
    raise PermissionError(13, "Permission denied")
  monkeypatch.setattr(ckpt._manager, "save", broken)
  with pytest.raises(UsageError, match=r"^checkpoint save at step 6 failed: "
                     r"PermissionError: .*Permission denied; the latest good "
                     r"checkpoint is step 5 in "):
    ckpt.save(6, make_state(6), {"position": 6})
  ckpt.close()


def test_a_first_save_failing_says_there_is_no_checkpoint(tmp_path,
                                                          monkeypatch):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  fail_commits(monkeypatch)
  ckpt.save(1, make_state(1), {})
  with pytest.raises(UsageError, match="there is no checkpoint in .* to resume"):
    ckpt.wait()
  ckpt.close()


def test_one_line_drops_tensorstore_specs():
  e = ValueError('DATA_LOSS: bad manifest [tensorstore_spec=\'{"a": 1}\']\nmore')
  assert checkpoint.one_line(e) == "ValueError: DATA_LOSS: bad manifest"
  assert checkpoint.one_line(KeyError()) == "KeyError"
  assert len(checkpoint.one_line(ValueError("x" * 1000))) < 220


def test_an_optimizer_state_that_gained_empty_nodes_still_restores(tmp_path):
  """AdamW's weight decay behind `optax.masked` wraps an empty state: the
  arrays are the same, the tree is not; checkpoints written before restore
  by path."""
  params = {"dense": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.ones(4)}}
  plain, masked = optax.adamw(1e-3), optax.adamw(1e-3, mask=lambda p: {
      "dense": {"kernel": True, "bias": False}})
  old = State(jnp.int32(7), params, plain.init(params))
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(7, old, {"position": 7})
  ckpt.close()
  new = State(jnp.int32(0), params, masked.init(params))
  restored, data = checkpoint.Checkpointer(str(tmp_path)).restore(new)
  assert data == {"position": 7} and int(restored.step) == 7
  assert (jax.tree_util.tree_structure(restored) ==
          jax.tree_util.tree_structure(new))
  for a, b in zip(jax.tree.leaves(restored.opt_state),
                  jax.tree.leaves(old.opt_state)):
    np.testing.assert_array_equal(a, b)
