"""One diffusion training step for the base model and the apprentice, in the split-once style.

The model is split into (graphdef, trainable params, everything else) once, outside `jax.jit`; the jitted
step merges them, computes the loss and its gradient, and returns the new state. The same step trains the
base text-to-image model (batches without neighbors) and the SuTI apprentice (batches with neighbors).

A batch is a dict of arrays:
  images [B,H,W,C] in [-1, 1], ids / text_mask [B,L]                       (always)
  neighbor_images [B,K,H,W,C], neighbor_ids / neighbor_text_mask [B,K,L],
  neighbor_mask [B,K] bool                                                 (apprentice only)
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax
from flax import nnx

from suti.diffusion.conditioning import drop_conditioning, mask_neighbors, select_kept
from suti.diffusion.losses import sample_timesteps, training_targets, weighted_mse
from suti.diffusion.schedules import Schedule
from suti.models.model import SuTIModel, null_text

Batch = dict[str, jax.Array]
NEIGHBOR_KEYS = ("neighbor_images", "neighbor_ids", "neighbor_text_mask", "neighbor_mask")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # nnx.State of the trainable parameters
  frozen: Any  # nnx.State of everything else (a frozen text encoder, non-parameter variables)
  opt_state: optax.OptState


def trainable_filter(cfg: mlc.ConfigDict):
  """Parameters that get gradients: all of them, minus the text encoder when text.trainable is False."""
  if cfg.text.trainable:
    return nnx.Param
  return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("text")))


def create_train_state(model: SuTIModel, tx: optax.GradientTransformation,
                       cfg: mlc.ConfigDict) -> tuple[nnx.GraphDef, TrainState]:
  graphdef, params, frozen = nnx.split(model, trainable_filter(cfg), ...)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, opt_state=tx.init(params))
  return graphdef, state


def check_batch(batch: Batch, model_neighbors: int) -> None:
  """Clear errors for batches that do not fit the model (host side, before jit)."""
  for key in ("images", "ids", "text_mask"):
    if key not in batch:
      raise ValueError(f"batch is missing '{key}'")
  has = [k in batch for k in NEIGHBOR_KEYS]
  if any(has) and not all(has):
    raise ValueError(f"an apprentice batch needs all of {NEIGHBOR_KEYS}")
  if all(has):
    if model_neighbors == 0:
      raise ValueError("batch has neighbors but the model has none (model.num_neighbors = 0)")
    k = batch["neighbor_images"].shape[1]
    if k > model_neighbors:
      raise ValueError(f"batch has {k} neighbors per example, more than model.num_neighbors = {model_neighbors}")


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: Schedule,
                    cfg: mlc.ConfigDict, null_ids: jax.Array, null_mask: jax.Array,
                    lr_schedule: optax.Schedule | None = None) -> Callable[[TrainState, Batch, jax.Array],
                                                                             tuple[TrainState, dict]]:
  """Returns step(state, batch, rng) -> (state, metrics); jit it with donate_argnums=0.

  null_ids / null_mask: token ids of the empty prompt, [1, L], the text a dropped caption becomes.
  """
  d = cfg.diffusion
  prediction, gamma = d.prediction, float(d.min_snr_gamma)

  def loss_fn(params, frozen, batch, rng):
    model = nnx.merge(graphdef, params, frozen)
    drop_rng, t_rng, noise_rng = jax.random.split(rng, 3)
    x0 = batch["images"]
    b = x0.shape[0]
    with_neighbors = "neighbor_images" in batch
    keep_text, keep_neighbors = drop_conditioning(
        drop_rng, b, d.p_drop_text, d.p_drop_neighbors if with_neighbors else 0.0,
        d.p_drop_both if with_neighbors else 0.0)
    ids = select_kept(keep_text, batch["ids"], null_ids)
    text_mask = select_kept(keep_text, batch["text_mask"], null_mask)
    neighbors = None
    if with_neighbors:
      neighbors = model.encode_neighbors(batch["neighbor_images"], batch["neighbor_ids"],
                                         batch["neighbor_text_mask"],
                                         mask_neighbors(batch["neighbor_mask"], keep_neighbors))
    t = sample_timesteps(t_rng, b, schedule.num_timesteps)
    noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
    x_t, target = training_targets(x0, t, noise, schedule, prediction)
    pred = model(x_t, t, ids, text_mask, neighbors)
    return weighted_mse(pred, target, t, schedule, prediction, gamma)

  def step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, dict]:
    loss, grads = jax.value_and_grad(loss_fn)(state.params, state.frozen, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    if lr_schedule is not None:
      metrics["lr"] = lr_schedule(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def build_trainer(cfg: mlc.ConfigDict, model: SuTIModel, schedule: Schedule):
  """Convenience: optimizer + state + jitted step for a model built from cfg."""
  from suti.train.optim import make_optimizer

  tx, lr = make_optimizer(cfg.train)
  graphdef, state = create_train_state(model, tx, cfg)
  null_ids, null_mask = null_text(model, 1)
  step = make_train_step(graphdef, tx, schedule, cfg, jnp.asarray(null_ids), jnp.asarray(null_mask), lr)
  return graphdef, state, jax.jit(step, donate_argnums=0)
