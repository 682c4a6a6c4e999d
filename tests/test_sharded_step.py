"""The sharded train step (8 fake CPU devices): the same numbers on every mesh, and the layout the rules ask for."""
import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from shared_fixtures import tiny_config

from suti.diffusion.schedules import make_schedule
from suti.models.model import SuTIModel, null_text
from suti.models.neighbors import is_neighbor_param
from suti.train import mesh as mesh_lib
from suti.train.sharding import path_string
from suti.train.step import make_train_step, split_model, step_rng
from suti.train.trainer import compile_step, sharded_train_state

pytestmark = pytest.mark.costly(seconds=315)  # cold seconds (--durations): costly files start first

OVERRIDES = [("mesh.fsdp_min_size", "256"), ("train.warmup_steps", "0"), ("train.ema_decay", "0.9")]
LR = 0.5
# Update agreement, per parameter array: max |du - du_ref| <= RTOL * max |du_ref| + ATOL_ULPS * eps32 * max |p0|,
# du = parameters (or EMA) after the steps minus before. The second term is float32 rounding of storing p0 + du
# (du is read back from the stored parameters). Measured worst max |du - du_ref| / bound over every params and EMA
# array (2 steps, LR 0.5): 0.055 on the (8,1) and (4,2) meshes, 0.070 on (1,8) and with grad accumulation, 0.092 for
# the apprentice; so >= 10x margin. Loss and gradient norm agree to < 1e-6 relative (asserted: 1e-5). An update 1%
# off is 10x over the bound (test_the_update_check_fails_for_a_gradient_one_percent_off).
RTOL, ATOL_ULPS = 1e-3, 8


def _optimizer() -> optax.GradientTransformation:
  """The trainer's gradient clipping, then SGD with momentum: every update is linear in the gradients, so comparing
  updates compares gradients. (With Adam the first update is lr * sign(g) whatever the gradient's size, and an
  element whose gradient is float noise, e.g. an attention key bias, moves by up to lr either way.) The momentum
  buffer is optimizer state laid out like the parameters, as Adam's moments are."""
  return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(LR, momentum=0.9))


def _batch(model, n=8, seed=0, k=0):
  rng = np.random.default_rng(seed)
  ids, mask = model.tokenize([f"a {c} ball" for c in ("red", "blue", "green", "pink") * (n // 4)])
  batch = {"images": rng.uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32), "ids": ids, "text_mask": mask}
  if k:
    demo_ids, demo_mask = model.tokenize([f"photo {i} of a ball" for i in range(n * k)])
    neighbor_mask = np.ones((n, k), bool)
    neighbor_mask[1, k - 1] = False  # a padded demo slot
    neighbor_mask[5] = False  # a row without demos
    batch.update(neighbor_images=rng.uniform(-1, 1, (n, k, 8, 8, 3)).astype(np.float32),
                 neighbor_ids=demo_ids.reshape(n, k, -1), neighbor_text_mask=demo_mask.reshape(n, k, -1),
                 neighbor_mask=neighbor_mask)
  return batch


def _train(cfg, mesh, steps=2, batch_seed=0, k=0):
  """Runs `steps` sharded steps; returns ([(loss, grad_norm)] per step, state, shardings, initial params on host)."""
  model = SuTIModel(cfg, rngs=nnx.Rngs(0))
  tx = _optimizer()
  graphdef, params, frozen = split_model(model, cfg)
  initial = jax.tree.map(np.array, params)
  state, shardings = sharded_train_state(params, frozen, tx, cfg, mesh)
  null_ids, null_mask = null_text(model, 1)
  step = make_train_step(graphdef, tx, make_schedule(cfg.diffusion), cfg, null_ids, null_mask)
  batch = mesh_lib.global_batch(_batch(model, seed=batch_seed, k=k), mesh)
  compiled = compile_step(lambda s, b: step(s, b, step_rng(s)), state, shardings, batch, mesh)
  losses = []
  for _ in range(steps):
    state, metrics = compiled(state, batch)
    losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  return losses, state, shardings, initial


def _update_mismatch(state_params, state_ema, ref_params, ref_ema, initial) -> float:
  """The worst max |du - du_ref| / (RTOL * max |du_ref| + ATOL_ULPS * eps * max |p0|) over every parameter and
  EMA array: <= 1 is agreement."""
  eps = float(np.finfo(np.float32).eps)
  worst, moved, total = 0.0, 0, 0
  for tree, ref in ((state_params, ref_params), (state_ema, ref_ema)):
    for a, b, p0 in zip(jax.tree.leaves(tree), jax.tree.leaves(ref), jax.tree.leaves(initial), strict=True):
      p0 = np.asarray(p0)
      du, du_ref = np.asarray(a) - p0, np.asarray(b) - p0
      bound = RTOL * np.abs(du_ref).max() + ATOL_ULPS * eps * np.abs(p0).max()
      if bound == 0:  # a zero array that did not move (e.g. a zero-initialised bias without gradient yet)
        worst = max(worst, np.inf if du.any() else 0.0)
      else:
        worst = max(worst, float(np.abs(du - du_ref).max() / bound))
      moved, total = moved + bool(np.abs(du_ref).max() > 0), total + 1
  assert moved > 0.9 * total, (moved, total)  # nearly every array has an update to compare
  return worst


def _assert_same_updates(state, ref_state, initial) -> float:
  worst = _update_mismatch(state.params, state.ema, ref_state.params, ref_state.ema, initial)
  assert worst <= 1.0, worst
  return worst


@pytest.fixture(scope="module")
def single_device_run():
  cfg = tiny_config(overrides=OVERRIDES + [("mesh.data", "1"), ("mesh.fsdp", "1")])
  return _train(cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1]))


def test_the_update_check_fails_for_a_gradient_one_percent_off(single_device_run):
  """The tolerance is one that can fail: the reference run with every update 1% larger (as a gradient 1% off
  would give under SGD) is far outside it, and so is one array's update alone 1% off."""
  _, ref_state, _, initial = single_device_run
  scaled = lambda tree: jax.tree.map(lambda p, p0: p0 + 1.01 * (np.asarray(p) - p0), tree, initial)
  assert _update_mismatch(scaled(ref_state.params), scaled(ref_state.ema), ref_state.params, ref_state.ema,
                          initial) > 5
  leaves, treedef = jax.tree.flatten(ref_state.params)
  p0_leaves = jax.tree.leaves(initial)
  name_of = [path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(ref_state.params)[0]]
  i = name_of.index("unet/mid_block/attentions/0/transformer_blocks/0/attn1/to_q/kernel")
  leaves = list(leaves)
  leaves[i] = p0_leaves[i] + 1.01 * (np.asarray(leaves[i]) - p0_leaves[i])
  assert _update_mismatch(jax.tree.unflatten(treedef, leaves), ref_state.ema, ref_state.params, ref_state.ema,
                          initial) > 5


@pytest.mark.parametrize("data,fsdp", [(8, 1), (4, 2), (1, 8)])
def test_sharded_step_matches_one_device(single_device_run, data, fsdp):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
  cfg = tiny_config(overrides=OVERRIDES + [("mesh.data", str(data)), ("mesh.fsdp", str(fsdp))])
  mesh = mesh_lib.make_mesh(cfg.mesh)
  assert dict(mesh.shape) == {"data": data, "fsdp": fsdp}
  losses, state, _, _ = _train(cfg, mesh)
  ref_losses, ref_state, _, initial = single_device_run
  # Loss and gradient norm agree to float32 reduction order; the updates of every parameter array and of the EMA
  # to 1e-3 of the array's update (RTOL, ATOL_ULPS above).
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert ref_losses[1][0] != ref_losses[0][0]  # the second step saw updated weights
  _assert_same_updates(state, ref_state, initial)

  # Layout: a large attention kernel is split over fsdp along its last dimension, norms stay whole, and the
  # optimizer state (the momentum buffer) lives where its parameters live.
  flat = {path_string(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  q = flat["unet/mid_block/attentions/0/transformer_blocks/0/attn1/to_q/kernel"]
  assert q.shape == (32, 32)
  expected = P(None, "fsdp") if fsdp > 1 else P()
  assert q.sharding.spec == expected
  assert q.addressable_shards[0].data.shape == (32, 32 // fsdp)
  norms = [leaf for name, leaf in flat.items() if "norm" in name]
  assert norms and all(leaf.sharding.spec == P() for leaf in norms)
  momentum = state.opt_state[1][0]
  assert isinstance(momentum, optax.TraceState)
  for param, trace in zip(jax.tree.leaves(state.params), jax.tree.leaves(momentum.trace), strict=True):
    assert param.sharding.spec == trace.sharding.spec
  batch_sharded = mesh_lib.global_batch({"x": np.zeros((8, 3), np.float32)}, mesh)["x"]
  assert {s.data.shape for s in batch_sharded.addressable_shards} == {(1, 3)}


def test_gradient_accumulation_equals_one_big_batch(single_device_run):
  cfg = tiny_config(overrides=OVERRIDES + [("mesh.data", "4"), ("mesh.fsdp", "2"), ("train.grad_accum_steps", "2")])
  losses, state, _, _ = _train(cfg, mesh_lib.make_mesh(cfg.mesh))
  ref_losses, ref_state, _, initial = single_device_run
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  _assert_same_updates(state, ref_state, initial)


def test_sharded_apprentice_step_with_neighbors_matches_one_device():
  """The apprentice on the (4, 2) mesh, demos in the batch (a padded slot, a row without demos): the neighbor
  encoder runs on the sharded batch and the neighbor layers are FSDP-sharded. Two steps, so the gradient reaches
  past the zero-initialised output projections into every neighbor layer."""
  ref_cfg = tiny_config("toy_suti.py", OVERRIDES + [("mesh.data", "1"), ("mesh.fsdp", "1")])
  ref_losses, ref_state, _, initial = _train(ref_cfg, mesh_lib.make_mesh(ref_cfg.mesh, jax.devices()[:1]), k=3)
  cfg = tiny_config("toy_suti.py", OVERRIDES + [("mesh.data", "4"), ("mesh.fsdp", "2")])
  losses, state, _, _ = _train(cfg, mesh_lib.make_mesh(cfg.mesh), k=3)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  _assert_same_updates(state, ref_state, initial)

  flat = {path_string(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  start = {path_string(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(initial)[0]}
  neighbor = {name: leaf for name, leaf in flat.items() if is_neighbor_param(name.split("/"))}
  assert any("fsdp" in leaf.sharding.spec for leaf in neighbor.values())
  kernels = [name for name in neighbor if name.endswith("kernel")]
  assert len(kernels) >= 10 and all(np.abs(np.asarray(flat[n]) - start[n]).max() > 0 for n in kernels), kernels


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
