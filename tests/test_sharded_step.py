"""The sharded train step (8 fake CPU devices): the same numbers on every mesh, and the layout the rules ask for."""
import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from shared_fixtures import tiny_config
from suti.diffusion.schedules import make_schedule
from suti.models.model import SuTIModel, null_text
from suti.train import mesh as mesh_lib
from suti.train.optim import make_optimizer
from suti.train.sharding import path_string
from suti.train.step import make_train_step, split_model, step_rng
from suti.train.trainer import compile_step, sharded_train_state

OVERRIDES = [("mesh.fsdp_min_size", "256"), ("train.lr", "1e-3"), ("train.warmup_steps", "0"),
             ("train.ema_decay", "0.9")]


def _batch(model, n=8, seed=0):
  rng = np.random.default_rng(seed)
  ids, mask = model.tokenize([f"a {c} ball" for c in ("red", "blue", "green", "pink") * (n // 4)])
  return {"images": rng.uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32), "ids": ids, "text_mask": mask}


def _train(cfg, mesh, steps=2, batch_seed=0):
  """Runs `steps` sharded steps; returns ([(loss, grad_norm)] per step, state, shardings)."""
  model = SuTIModel(cfg, rngs=nnx.Rngs(0))
  tx, lr = make_optimizer(cfg.train)
  graphdef, params, frozen = split_model(model, cfg)
  state, shardings = sharded_train_state(params, frozen, tx, cfg, mesh)
  null_ids, null_mask = null_text(model, 1)
  step = make_train_step(graphdef, tx, make_schedule(cfg.diffusion), cfg, null_ids, null_mask, lr)
  batch = mesh_lib.global_batch(_batch(model, seed=batch_seed), mesh)
  compiled = compile_step(lambda s, b: step(s, b, step_rng(s)), state, shardings, batch, mesh)
  losses = []
  for _ in range(steps):
    state, metrics = compiled(state, batch)
    losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  return losses, state, shardings


def _assert_same_updates(state, ref_state, lr=1e-3):
  """Parameters and EMA after the steps agree with the single-device run.

  Adam divides each gradient by its own running scale, so an element whose gradient is at the float noise floor
  (mathematically zero, e.g. a bias in front of a normalisation) moves by an arbitrary fraction of lr depending on
  reduction order. Those elements are recognised by a reference update well below lr and only bounded; all the
  others (checked to be the vast majority) must agree to 3% of one step."""
  initial = _initial_params()
  checked = total = 0
  for tree, ref in ((state.params, ref_state.params), (state.ema, ref_state.ema)):
    scale = 0.1 if tree is state.ema else 1.0  # EMA (decay 0.9) moves a tenth of the parameters' way
    for a, b, p0 in zip(jax.tree.leaves(tree), jax.tree.leaves(ref), jax.tree.leaves(initial)):
      a, b, p0 = np.asarray(a), np.asarray(b), np.asarray(p0)
      moving = np.abs(b - p0) > 0.2 * lr * scale
      np.testing.assert_allclose(a[moving], b[moving], rtol=1e-4, atol=3e-5 * scale)
      assert np.all(np.abs(a - b) <= 4 * lr)
      checked, total = checked + moving.sum(), total + moving.size
  assert checked > 0.9 * total, (checked, total)


@functools.lru_cache(maxsize=1)
def _initial_params():
  cfg = tiny_config(overrides=OVERRIDES)
  return split_model(SuTIModel(cfg, rngs=nnx.Rngs(0)), cfg)[1]


@pytest.fixture(scope="module")
def single_device_run():
  cfg = tiny_config(overrides=OVERRIDES + [("mesh.data", "1"), ("mesh.fsdp", "1")])
  return _train(cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1]))


@pytest.mark.parametrize("data,fsdp", [(8, 1), (4, 2), (1, 8)])
def test_sharded_step_matches_one_device(single_device_run, data, fsdp):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
  cfg = tiny_config(overrides=OVERRIDES + [("mesh.data", str(data)), ("mesh.fsdp", str(fsdp))])
  mesh = mesh_lib.make_mesh(cfg.mesh)
  assert dict(mesh.shape) == {"data": data, "fsdp": fsdp}
  losses, state, shardings = _train(cfg, mesh)
  ref_losses, ref_state, _ = single_device_run
  # Loss and gradient norm agree to float32 reduction order. Parameters agree to a small fraction of one Adam
  # step (lr = 1e-3 per element): Adam divides by the gradient's own scale, so elements whose gradient is near
  # zero amplify reduction-order noise. The gradient norm catches what Adam's scale invariance would hide.
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert ref_losses[1][0] != ref_losses[0][0]  # the second step saw updated weights
  _assert_same_updates(state, ref_state)

  # Layout: a large attention kernel is split over fsdp along its last dimension, norms stay whole, and the
  # Adam moments live where their parameters live.
  flat = {path_string(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  q = flat["unet/mid_block/attentions/0/transformer_blocks/0/attn1/to_q/kernel"]
  assert q.shape == (32, 32)
  expected = P(None, "fsdp") if fsdp > 1 else P()
  assert q.sharding.spec == expected
  assert q.addressable_shards[0].data.shape == (32, 32 // fsdp)
  norms = [leaf for name, leaf in flat.items() if "norm" in name]
  assert norms and all(leaf.sharding.spec == P() for leaf in norms)
  adam = state.opt_state[1][0]
  assert isinstance(adam, optax.ScaleByAdamState)
  for param, mu in zip(jax.tree.leaves(state.params), jax.tree.leaves(adam.mu)):
    assert param.sharding.spec == mu.sharding.spec
  batch_sharded = mesh_lib.global_batch({"x": np.zeros((8, 3), np.float32)}, mesh)["x"]
  assert {s.data.shape for s in batch_sharded.addressable_shards} == {(1, 3)}


def test_gradient_accumulation_equals_one_big_batch(single_device_run):
  cfg = tiny_config(overrides=OVERRIDES + [("mesh.data", "4"), ("mesh.fsdp", "2"), ("train.grad_accum_steps", "2")])
  losses, state, _ = _train(cfg, mesh_lib.make_mesh(cfg.mesh))
  ref_losses, ref_state, _ = single_device_run
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  _assert_same_updates(state, ref_state)


def test_mesh_and_batch_errors_are_clear():
  cfg = tiny_config(overrides=[("mesh.data", "3"), ("mesh.fsdp", "-1")])
  with pytest.raises(ValueError, match="cannot be split"):
    mesh_lib.make_mesh(cfg.mesh)
  cfg = tiny_config(overrides=[("mesh.data", "2"), ("mesh.fsdp", "2")])
  with pytest.raises(ValueError, match="4 devices, but 8"):
    mesh_lib.make_mesh(cfg.mesh)
  mesh = mesh_lib.make_mesh(tiny_config().mesh)
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    mesh_lib.check_batch_size(12, mesh)
  with pytest.raises(ValueError, match="grad_accum_steps=5"):
    mesh_lib.check_batch_size(16, mesh, 5)
