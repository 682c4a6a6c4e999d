"""Optimizers, schedules, gradient clipping's flag, EMA, the NaN guard and bf16 compute of the train step."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from shared_fixtures import tiny_config
from suti.diffusion.schedules import make_schedule
from suti.models.model import SuTIModel
from suti.train.optim import learning_rate_schedule, make_optimizer
from suti.train.step import build_trainer

pytestmark = pytest.mark.costly(seconds=110)  # cold seconds (--durations): costly files start first


def _train_cfg(**changes):
  cfg = tiny_config(overrides=[("train.lr", "0.1"), ("train.warmup_steps", "0"), ("train.steps", "10")])
  for key, value in changes.items():
    cfg.train[key] = value
  return cfg.train


def _updates(tx, grads_seq, params):
  state, out = tx.init(params), []
  for g in grads_seq:
    u, state = tx.update(g, state, params)
    out.append(u)
  return out


def test_clipping_happens_exactly_when_its_flag_is_on():
  params = {"w": jnp.ones(4)}
  big, small = {"w": jnp.array([60.0, -80.0, 0.0, 0.0])}, {"w": jnp.array([0.3, 0.1, -0.2, 0.4])}
  plain = optax.adamw(learning_rate_schedule(_train_cfg()), b1=0.9, b2=0.999, weight_decay=0.0)
  on, _ = make_optimizer(_train_cfg(clip_grad=True, grad_clip=1.0))
  off, _ = make_optimizer(_train_cfg(clip_grad=False, grad_clip=1.0))
  clipped = {"w": big["w"] / 100.0}  # global norm 100 -> 1
  np.testing.assert_allclose(_updates(off, [big, small], params)[1]["w"],
                             _updates(plain, [big, small], params)[1]["w"], rtol=1e-6)
  np.testing.assert_allclose(_updates(on, [big, small], params)[1]["w"],
                             _updates(plain, [clipped, small], params)[1]["w"], rtol=1e-6)
  assert not np.allclose(_updates(on, [big, small], params)[1]["w"], _updates(off, [big, small], params)[1]["w"])
  with pytest.raises(ValueError, match="grad_clip=0"):
    make_optimizer(_train_cfg(clip_grad=True, grad_clip=0.0))


def test_schedules():
  cosine = learning_rate_schedule(_train_cfg(warmup_steps=2, lr_schedule="cosine"))
  constant = learning_rate_schedule(_train_cfg(warmup_steps=2, lr_schedule="constant"))
  assert float(cosine(0)) == 0.0 and float(constant(0)) == 0.0
  np.testing.assert_allclose([float(cosine(1)), float(constant(1))], [0.05, 0.05], rtol=1e-6)
  np.testing.assert_allclose(float(cosine(2)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(cosine(6)), 0.05, rtol=1e-5)  # half way through the cosine
  assert float(cosine(10)) == pytest.approx(0.0, abs=1e-9)
  assert float(constant(10)) == float(constant(1000)) == pytest.approx(0.1)
  with pytest.raises(ValueError, match="lr_schedule"):
    learning_rate_schedule(_train_cfg(lr_schedule="linear"))


def test_adafactor_minimises_a_quadratic_and_unknown_optimizers_are_named():
  tx, _ = make_optimizer(_train_cfg(optimizer="adafactor", lr=0.05, lr_schedule="constant"))
  params = {"w": jnp.full((4, 3), 2.0)}
  state = tx.init(params)
  loss = lambda p: jnp.sum(p["w"] ** 2)
  start = float(loss(params))
  for _ in range(20):
    u, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, u)
  assert float(loss(params)) < 0.5 * start
  with pytest.raises(ValueError, match="train.optimizer must be one of"):
    make_optimizer(_train_cfg(optimizer="sgd"))


def _batch(model, n=4, nan=False):
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32)
  if nan:
    images[1, 2, 3, 0] = np.nan
  ids, mask = model.tokenize(["a red ball"] * n)
  return {"images": jnp.asarray(images), "ids": jnp.asarray(ids), "text_mask": jnp.asarray(mask)}


@functools.lru_cache(maxsize=None)
def _trainer(overrides=()):
  """(model, host copy of the initial state, jitted step): compiled once per config for the tests below."""
  cfg = tiny_config(overrides=[("train.ema_decay", "0.9"), ("train.warmup_steps", "0")] + list(overrides))
  model = SuTIModel(cfg, rngs=nnx.Rngs(0))
  _, state, step = build_trainer(cfg, model, make_schedule(cfg.diffusion))
  return model, jax.tree.map(np.asarray, state), step


def _one_step(overrides=(), nan=False):
  model, before, step = _trainer(tuple(overrides))
  state = jax.tree.map(jnp.asarray, before)  # a fresh device copy: the step donates its input state
  after, metrics = step(state, _batch(model, nan=nan), jax.random.key(1))
  return before, jax.tree.map(np.asarray, after), jax.tree.map(np.asarray, metrics), model


def test_ema_is_the_closed_form_after_one_step():
  before, after, metrics, _ = _one_step()
  assert not metrics["nonfinite"]
  for p0, p1, ema in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params),
                         jax.tree.leaves(after.ema)):
    np.testing.assert_allclose(ema, 0.9 * p0 + 0.1 * p1, rtol=1e-6, atol=1e-7)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params)))


def test_a_nan_batch_leaves_the_state_untouched():
  before, after, metrics, _ = _one_step(nan=True)
  assert metrics["nonfinite"] and not np.isfinite(metrics["loss"])
  assert int(after.step) == int(before.step) + 1  # the step is counted, so the trainer can name it
  for name in ("params", "opt_state", "ema"):
    for a, b in zip(jax.tree.leaves(getattr(before, name)), jax.tree.leaves(getattr(after, name))):
      np.testing.assert_array_equal(a, b)


def test_bf16_compute_keeps_float32_master_weights():
  _, f32, m32, _ = _one_step()
  _, bf16, m16, model = _one_step((("model.dtype", "bfloat16"),))
  assert {leaf.dtype for leaf in jax.tree.leaves(bf16.params)} == {np.dtype(np.float32)}
  assert abs(float(m16["loss"]) - float(m32["loss"])) < 0.05 * float(m32["loss"])
  assert float(m16["loss"]) != float(m32["loss"])
  # the forward pass really runs its matrix products in bf16
  x = jnp.zeros((1, 8, 8, 3))
  ids, mask = model.tokenize(["a"])
  jaxpr = str(jax.make_jaxpr(lambda: model(x, jnp.zeros((1,), jnp.int32), ids, mask))())
  assert "bf16" in jaxpr
