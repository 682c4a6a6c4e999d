"""Orbax checkpoints: exact sharded round trip, async, keep-N, fallback past corrupt steps, weights-only reads."""
import os
import warnings
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from suti.checkpoint.store import Checkpointer, load_params


class Counter(nnx.Variable):
  """A non-parameter variable, so the `frozen` part of the state is not empty."""


class Tiny(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.inp = nnx.Linear(4, 16, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(16, 8, rngs=rngs)])
    self.seen = Counter(jnp.arange(3, dtype=jnp.int32))


@flax.struct.dataclass
class State:
  step: jax.Array
  params: Any
  frozen: Any
  ema: Any
  opt_state: Any
  rng: jax.Array
  positions: np.ndarray  # per-host input positions, int64 on the host


def _mesh() -> Mesh:
  return Mesh(np.array(jax.devices()), ("fsdp",))


def _param_sharding(mesh: Mesh, leaf: jax.Array) -> NamedSharding:
  """Shard dim 0 over every device when it divides, else replicate."""
  n = mesh.devices.size
  if leaf.ndim >= 1 and leaf.shape[0] % n == 0:
    return NamedSharding(mesh, P("fsdp"))
  return NamedSharding(mesh, P())


def _state(seed: int = 0, mesh: Mesh | None = None) -> State:
  mesh = mesh or _mesh()
  _, params, frozen = nnx.split(Tiny(nnx.Rngs(seed)), nnx.Param, ...)
  params = jax.tree.map(lambda x: jax.device_put(x + seed, _param_sharding(mesh, x)), params)
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  # one real update so mu / nu / count are not all zeros
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
  _, opt_state = tx.update(grads, opt_state, params)
  ema = jax.tree.map(lambda x: (x * 0.5).astype(jnp.bfloat16), params)
  return State(step=jnp.asarray(7 + seed, jnp.int32), params=params, frozen=frozen, ema=ema, opt_state=opt_state,
               rng=jax.random.key_data(jax.random.key(seed)),
               positions=np.array([[3 + seed, 2**40 + seed]], np.int64))


def _abstract(state: State, mesh: Mesh | None = None) -> State:
  """The state's abstract tree; with `mesh`, every array replicated on it instead of its own sharding."""
  def one(x):
    if isinstance(x, np.ndarray):
      return x
    sharding = NamedSharding(mesh, P()) if mesh is not None else x.sharding
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(one, state)


def _assert_same(a: Any, b: Any) -> None:
  leaves_a, tree_a = jax.tree_util.tree_flatten(a)
  leaves_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _largest_file(step_dir: str, array_data: bool) -> str:
  """The biggest file of a step; with array_data, the biggest tensor data file an item reads (`<item>/d/*`;
  the copies under `<item>/ocdbt.process_N/` are not read once Orbax has merged them)."""
  files = []
  for root, _, names in os.walk(step_dir):
    rel = os.path.relpath(root, step_dir).split(os.sep)
    if not array_data or (len(rel) == 2 and rel[1] == "d"):
      files.extend(os.path.join(root, f) for f in names)
  return max(files, key=os.path.getsize)


def _save_steps(ckpt: Checkpointer, steps) -> dict[int, State]:
  states = {}
  for step in steps:
    states[step] = _state(seed=step)
    ckpt.save(step, states[step], {"step": step, "config": {"lr": 1e-3}})
  ckpt.wait()
  return states


def test_round_trip_is_exact_with_shardings(tmp_path):
  state = _state()
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  ckpt.save(7, state, {"config": {"model": "tiny"}, "position": [3, 4]})
  ckpt.close()
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))  # a restarted run restores before it ever saves
  step, restored, meta = ckpt.restore(_abstract(state))
  assert step == 7 and meta == {"config": {"model": "tiny"}, "position": [3, 4]}
  _assert_same(restored, state)
  assert restored.positions.dtype == np.int64 and restored.ema["inp"]["kernel"].dtype == jnp.bfloat16
  kernel = restored.params["inp"]["kernel"]
  assert kernel.sharding == state.params["inp"]["kernel"].sharding
  assert restored.opt_state[0].mu["inp"]["kernel"].sharding == state.opt_state[0].mu["inp"]["kernel"].sharding
  # the shardings asked for win over the saved ones
  n = jax.device_count()
  other = Mesh(np.array(jax.devices()).reshape(n // 2, 2) if n % 2 == 0 else np.array(jax.devices())[:, None],
               ("data", "fsdp"))
  _, replicated, _ = ckpt.restore(_abstract(state, other), step=7)
  _assert_same(replicated, state)
  for leaf in jax.tree.leaves(replicated):
    if isinstance(leaf, jax.Array):
      assert leaf.sharding == NamedSharding(other, P())
  ckpt.close()


def test_async_save_then_wait_restores_equal(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=True)
  states = {step: _state(seed=step) for step in (1, 2)}
  for step, state in states.items():  # the second save waits for the first
    ckpt.save(step, state, {"step": step})
  # save returned with the arrays already off device: the trainer may donate them to the next step
  live = _state(seed=2)
  for leaf in jax.tree.leaves(states[2]):
    if isinstance(leaf, jax.Array):
      leaf.delete()
  ckpt.wait()
  states[2] = live
  assert ckpt.latest_step() == 2
  step, restored, meta = ckpt.restore(_abstract(states[2]))
  assert step == 2 and meta["step"] == 2
  _assert_same(restored, states[2])
  _, first, _ = ckpt.restore(_abstract(states[1]), step=1)
  _assert_same(first, states[1])
  ckpt.close()


def test_killed_save_and_bad_input(tmp_path):
  directory = tmp_path / "checkpoints"
  ckpt = Checkpointer(str(directory), async_save=False)
  state = _state()
  _save_steps(ckpt, [1])
  ckpt.close()
  (directory / "2.orbax-checkpoint-tmp-1234").mkdir()  # a run killed in the middle of saving step 2
  ckpt = Checkpointer(str(directory))
  assert ckpt.latest_step() == 1 and ckpt.restore(_abstract(state))[0] == 1
  ckpt.wait()
  assert not (directory / "2.orbax-checkpoint-tmp-1234").exists()  # cleaned up by the restarted run
  with pytest.raises(ValueError, match=r"^no checkpoint for step 3 in .* \(have \[1\]\)$"):
    ckpt.restore(_abstract(state), step=3)
  with pytest.raises(ValueError, match=r"^checkpoint meta must be JSON-able"):
    ckpt.save(2, state, {"bad": object()})
  ckpt.close()


def test_keep_two_leaves_last_two_steps(tmp_path):
  directory = tmp_path / "checkpoints"
  ckpt = Checkpointer(str(directory), keep=2)
  _save_steps(ckpt, [1, 2, 3, 4])
  assert ckpt.all_steps() == [3, 4]
  assert sorted(p.name for p in directory.iterdir() if p.name.isdigit()) == ["3", "4"]
  ckpt.close()


def test_saving_an_existing_step_is_a_no_op_unless_forced(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  first, second = _state(seed=1), _state(seed=2)
  ckpt.save(5, first, {"v": 1})
  ckpt.save(5, second, {"v": 2})
  _, restored, meta = ckpt.restore(_abstract(first))
  assert meta == {"v": 1}
  _assert_same(restored, first)
  ckpt.save(5, second, {"v": 2}, force=True)
  _, restored, meta = ckpt.restore(_abstract(second))
  assert meta == {"v": 2}
  _assert_same(restored, second)
  ckpt.close()


@pytest.mark.parametrize("array_data", [True, False], ids=["array-data", "any-file"])
def test_truncated_latest_falls_back_and_step_can_be_saved_again(tmp_path, array_data):
  directory = tmp_path / "checkpoints"
  ckpt = Checkpointer(str(directory))
  states = _save_steps(ckpt, [1, 2, 3, 4])
  ckpt.close()
  victim = _largest_file(str(directory / "4"), array_data)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  ckpt = Checkpointer(str(directory))  # a restarted run
  with pytest.warns(UserWarning, match=r"checkpoint step 4 is corrupt"):
    step, restored, meta = ckpt.restore(_abstract(states[3]))
  assert step == 3 and meta["step"] == 3
  _assert_same(restored, states[3])
  assert (directory / "4.corrupt").is_dir() and not (directory / "4").exists()
  assert ckpt.latest_step() == 3
  again = _state(seed=40)
  ckpt.save(4, again, {"step": 4})
  ckpt.wait()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    step, restored, _ = ckpt.restore(_abstract(again))
  assert step == 4
  _assert_same(restored, again)
  ckpt.close()


def test_partial_step_falls_back_and_all_bad_gives_none(tmp_path):
  directory = tmp_path / "checkpoints"
  ckpt = Checkpointer(str(directory), async_save=False)
  states = _save_steps(ckpt, [1, 2])
  ckpt.close()
  ckpt = Checkpointer(str(directory))
  for path in (directory / "2" / "opt_state").iterdir():  # a save cut short: the optimizer item's files are gone
    if path.is_file():
      path.unlink()
  with pytest.warns(UserWarning, match=r"checkpoint step 2 is corrupt"):
    step, restored, _ = ckpt.restore(_abstract(states[1]))
  assert step == 1
  _assert_same(restored, states[1])
  os.remove(directory / "1" / "meta" / "metadata")  # the JSON meta item lost its file
  with pytest.warns(UserWarning) as record:
    assert ckpt.restore(_abstract(states[1])) is None
  messages = [str(w.message) for w in record]
  assert any("checkpoint step 1 is corrupt" in m for m in messages)
  assert any("no readable checkpoint" in m for m in messages)
  assert ckpt.latest_step() is None
  ckpt.close()


def test_explicit_corrupt_step_is_an_error_and_stays(tmp_path):
  directory = tmp_path / "checkpoints"
  ckpt = Checkpointer(str(directory), async_save=False)
  states = _save_steps(ckpt, [1, 2])
  os.remove(directory / "1" / "meta" / "metadata")
  with pytest.raises(ValueError, match=r"^checkpoint step 1 in .* is corrupt \("):
    ckpt.restore(_abstract(states[1]), step=1)
  assert (directory / "1").is_dir() and ckpt.all_steps() == [1, 2]
  ckpt.close()


def test_mismatched_state_is_an_error_not_corruption(tmp_path):
  directory = tmp_path / "checkpoints"
  ckpt = Checkpointer(str(directory), async_save=False)
  state = _state()
  ckpt.save(1, state, {})
  wrong = _abstract(state).replace(rng=jax.ShapeDtypeStruct((4,), jnp.uint32, sharding=state.rng.sharding))
  with pytest.raises(ValueError, match=r"rng is \(2,\) uint32, the state wants \(4,\) uint32"):
    ckpt.restore(wrong)
  assert (directory / "1").is_dir() and ckpt.latest_step() == 1
  ckpt.close()


def test_restore_without_checkpoints_is_none(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  assert ckpt.latest_step() is None
  assert ckpt.restore(_abstract(_state())) is None
  ckpt.close()


def test_load_params_reads_weights_only(tmp_path):
  workdir = tmp_path / "run"
  ckpt = Checkpointer(str(workdir / "checkpoints"), async_save=False)
  states = _save_steps(ckpt, [1, 2])
  ckpt.close()
  weights, meta = load_params(str(workdir))
  assert meta["step"] == 2
  # the whole model (EMA params + the frozen part) with nnx.state(model) paths, and nothing of the optimizer
  assert set(weights) == {"inp", "blocks", "seen"}
  ema = states[2].ema
  np.testing.assert_array_equal(weights["inp"]["kernel"], np.asarray(ema["inp"]["kernel"]))
  assert weights["inp"]["kernel"].dtype == jnp.bfloat16 and isinstance(weights["inp"]["kernel"], np.ndarray)
  np.testing.assert_array_equal(weights["seen"], np.arange(3))
  # the tree loads straight into a fresh model
  model = Tiny(nnx.Rngs(9))
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, weights)
  nnx.update(model, state)
  np.testing.assert_array_equal(np.asarray(model.blocks[0].bias[...]), np.asarray(ema["blocks"][0]["bias"]))

  raw, meta = load_params(str(workdir / "checkpoints" / "1"), prefer_ema=False)
  assert meta["step"] == 1
  expected = nnx.to_pure_dict(states[1].params) | nnx.to_pure_dict(states[1].frozen)
  _assert_same(raw, jax.tree.map(np.asarray, expected))
  # a damaged newest step is skipped (and left where it is)
  os.remove(workdir / "checkpoints" / "2" / "ema" / "_METADATA")
  with pytest.warns(UserWarning, match=r"checkpoint step 2 in .* is unreadable"):
    _, meta = load_params(str(workdir / "checkpoints"))
  assert meta["step"] == 1 and (workdir / "checkpoints" / "2").is_dir()


def test_load_params_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match=r"^no readable checkpoint in .*checkpoints$"):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    load_params(str(tmp_path / "run"))
  with pytest.raises(ValueError, match=r"not a directory"):
    load_params(str(tmp_path / "missing"))


@pytest.mark.parametrize("replica_parallel", [False, True])
def test_one_process_saves_replicated_arrays_without_slicing_them(tmp_path, caplog, replica_parallel):
  """One process writes each replicated array whole: no per-device slice ops (a compile per new shape: 8.6x
  the save time of the toy apprentice's state on 8 devices, benchmarks/checkpoint_save.py). Replica-parallel
  saving, kept for multi-host runs, is shown to slice."""
  replicated = NamedSharding(_mesh(), P())
  # shapes no other test uses, so every slice op would be traced afresh and logged
  state = {"a": jax.device_put(jnp.ones((24, 5), jnp.float32), replicated),
           "b": jax.device_put(jnp.ones((16, 3, 7), jnp.float32), replicated)}
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False, replica_parallel=replica_parallel)
  with caplog.at_level("WARNING"), jax.log_compiles():
    ckpt.save(1, state, {})
    ckpt.wait()
  slices = [r for r in caplog.records if "slice" in r.getMessage() and "Finished tracing" in r.getMessage()]
  assert bool(slices) == replica_parallel, [r.getMessage() for r in caplog.records][:5]
  _, restored, _ = ckpt.restore(state)
  assert all(np.array_equal(restored[k], state[k]) for k in state)
  ckpt.close()
