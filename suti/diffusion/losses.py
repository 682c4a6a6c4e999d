"""The denoising training loss, model-agnostic: `model_fn(x_t, t) -> output` (eps or v).

min-SNR-gamma weighting (Hang et al. 2023) caps the weight of low-noise timesteps: for an eps target
the per-example weight is min(SNR, gamma) / SNR, for a v target min(SNR, gamma) / (SNR + 1); both equal
the x0-space weight min(SNR, gamma) expressed in the target's space.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from suti.diffusion.schedules import Schedule, check_prediction

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def sample_timesteps(rng: jax.Array, batch_size: int, num_timesteps: int) -> jax.Array:
  """t ~ Uniform{0, ..., T-1}, int32 [B]."""
  return jax.random.randint(rng, (batch_size,), 0, num_timesteps, dtype=jnp.int32)


def training_targets(x0: jax.Array, t: jax.Array, noise: jax.Array, schedule: Schedule,
                     prediction: str) -> tuple[jax.Array, jax.Array]:
  """Returns (x_t, target): the model input and what it should predict."""
  return schedule.q_sample(x0, t, noise), schedule.target(x0, noise, t, prediction)


def min_snr_weights(t: jax.Array, schedule: Schedule, prediction: str, gamma: float) -> jax.Array:
  """Per-example loss weights [B]; gamma <= 0 disables the weighting (all ones)."""
  check_prediction(prediction)
  if gamma <= 0:
    return jnp.ones(t.shape, jnp.float32)
  snr = schedule.snr(t)
  capped = jnp.minimum(snr, gamma)
  return capped / snr if prediction == "eps" else capped / (snr + 1.0)


def per_example_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error over all but the batch axis, in float32: [B]."""
  err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
  return err.reshape(err.shape[0], -1).mean(axis=1)


def weighted_mse(pred: jax.Array, target: jax.Array, t: jax.Array, schedule: Schedule,
                 prediction: str = "eps", min_snr_gamma: float = 0.0,
                 example_weight: jax.Array | None = None) -> jax.Array:
  """Batch mean of min-SNR-weighted per-example MSE (plain MSE when min_snr_gamma is 0): scalar.

  example_weight [B] multiplies each example's term (DreamBooth's prior-preservation weight on class images).
  """
  weights = min_snr_weights(t, schedule, prediction, min_snr_gamma)
  if example_weight is not None:
    weights = weights * example_weight.astype(jnp.float32)
  return jnp.mean(weights * per_example_mse(pred, target))


def diffusion_loss(model_fn: ModelFn, x0: jax.Array, rng: jax.Array, schedule: Schedule,
                   prediction: str = "eps", min_snr_gamma: float = 0.0) -> jax.Array:
  """Draws t and noise, noises x0 and returns the (weighted) regression loss of model_fn: scalar.

  model_fn closes over its parameters (e.g. `lambda x, t: unet_apply(params, x, t, ...)`), so
  `jax.grad` of a wrapper over parameters works as usual.
  """
  t_rng, noise_rng = jax.random.split(rng)
  t = sample_timesteps(t_rng, x0.shape[0], schedule.num_timesteps)
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  x_t, target = training_targets(x0, t, noise, schedule, prediction)
  return weighted_mse(model_fn(x_t, t), target, t, schedule, prediction, min_snr_gamma)
