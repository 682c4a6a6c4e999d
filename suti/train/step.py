"""One diffusion training step for the base model and the apprentice, in the split-once style.

The model is split into (graphdef, trainable params, everything else) once, outside `jax.jit`; the jitted
step merges them, computes the loss and its gradient, and returns the new state. The same step trains the
base text-to-image model (batches without neighbors), the SuTI apprentice (batches with neighbors) and the
DreamBooth experts (suti/experts/dreambooth.py: LoRA or full fine-tuning, prior preservation via loss_weight).

A batch is a dict of arrays:
  images [B,H,W,C] in [-1, 1], ids / text_mask [B,L]                       (always)
  neighbor_images [B,K,H,W,C], neighbor_ids / neighbor_text_mask [B,K,L],
  neighbor_mask [B,K] bool                                                 (apprentice only)
  loss_weight [B] float                                                    (optional: per-example loss weights,
                                                                            e.g. DreamBooth's prior preservation)

What the step does beyond the loss:
- gradient accumulation: the batch is cut into train.grad_accum_steps micro-batches (strided, so each stays
  spread over every device) whose gradients are averaged; every random draw (timesteps, noise, dropout) is made
  for the whole batch first, so accumulation gives the same update as one big batch;
- a NaN / inf guard: a non-finite loss or gradient leaves params, optimizer state and EMA untouched and sets
  metrics["nonfinite"]; the trainer stops and names the step;
- EMA weights (train.ema_decay > 0), updated after every step.
Parameters are float32 master weights; `model.dtype = "bfloat16"` makes the forward pass compute in bf16.
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
from suti.models.model import SuTIModel, null_text, vae_config
from suti.train.optim import make_optimizer

Batch = dict[str, jax.Array]
NEIGHBOR_KEYS = ("neighbor_images", "neighbor_ids", "neighbor_text_mask", "neighbor_mask")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # nnx.State of the trainable parameters (float32 master weights)
  frozen: Any  # nnx.State of everything else (a frozen text encoder, non-parameter variables)
  opt_state: optax.OptState
  ema: Any  # nnx.State like params, or None when train.ema_decay is 0
  rng: jax.Array  # uint32 key data; step n draws from fold_in(rng, n), so a resumed run draws the same numbers


def trainable_filter(cfg: mlc.ConfigDict):
  """Parameters that get gradients: all of them, minus the text encoder when text.trainable is False, and never
  the VAE of a latent model (it stays as loaded)."""
  frozen = nnx.PathContains("vae") if cfg.text.trainable else nnx.Any(nnx.PathContains("vae"),
                                                                       nnx.PathContains("text"))
  return nnx.All(nnx.Param, nnx.Not(frozen))


def split_model(model: SuTIModel, cfg: mlc.ConfigDict) -> tuple[nnx.GraphDef, Any, Any]:
  return nnx.split(model, trainable_filter(cfg), ...)


def init_train_state(params: Any, frozen: Any, tx: optax.GradientTransformation, cfg: mlc.ConfigDict) -> TrainState:
  """A fresh state; jit it with out_shardings to create it directly on the mesh."""
  ema = jax.tree.map(jnp.copy, params) if cfg.train.ema_decay > 0 else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, opt_state=tx.init(params),
                    ema=ema, rng=jax.random.key_data(jax.random.key(cfg.train.seed)))


def create_train_state(model: SuTIModel, tx: optax.GradientTransformation,
                       cfg: mlc.ConfigDict) -> tuple[nnx.GraphDef, TrainState]:
  graphdef, params, frozen = split_model(model, cfg)
  return graphdef, init_train_state(params, frozen, tx, cfg)


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


def _micro_batches(tree: Any, num: int) -> Any:
  """[B, ...] -> [num, B/num, ...] taking every num-th example, so a batch sharded in contiguous blocks over the
  devices yields micro-batches that are still spread over all of them."""
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1), tree)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: Schedule,
                    cfg: mlc.ConfigDict, null_ids: jax.Array, null_mask: jax.Array,
                    lr_schedule: optax.Schedule | None = None) -> Callable[[TrainState, Batch, jax.Array],
                                                                             tuple[TrainState, dict]]:
  """Returns step(state, batch, rng) -> (state, metrics); jit it with donate_argnums=0. Batches hold images in
  model range at the model's output size; a latent model's step encodes them with its frozen VAE first.

  null_ids / null_mask: token ids of the empty prompt, [1, L], the text a dropped caption becomes.
  """
  d = cfg.diffusion
  prediction, gamma = d.prediction, float(d.min_snr_gamma)
  accum = int(cfg.train.get("grad_accum_steps", 1))
  ema_decay = float(cfg.train.ema_decay)
  latent = vae_config(cfg) is not None  # batches hold pixels; the step encodes them (neighbors: the model does)

  def draws(rng: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Every random number of the step, for the whole batch (independent of grad_accum_steps)."""
    drop_rng, t_rng, noise_rng = jax.random.split(rng, 3)
    b = batch["images"].shape[0]
    with_neighbors = "neighbor_images" in batch
    keep_text, keep_neighbors = drop_conditioning(
        drop_rng, b, d.p_drop_text, d.p_drop_neighbors if with_neighbors else 0.0,
        d.p_drop_both if with_neighbors else 0.0)
    return dict(keep_text=keep_text, keep_neighbors=keep_neighbors,
                t=sample_timesteps(t_rng, b, schedule.num_timesteps),
                noise=jax.random.normal(noise_rng, batch["images"].shape, jnp.float32))

  def loss_fn(params, frozen, batch: Batch, r: dict[str, jax.Array]) -> jax.Array:
    model = nnx.merge(graphdef, params, frozen)
    ids = select_kept(r["keep_text"], batch["ids"], null_ids)
    text_mask = select_kept(r["keep_text"], batch["text_mask"], null_mask)
    neighbors = None
    if "neighbor_images" in batch:
      neighbors = model.encode_neighbors(batch["neighbor_images"], batch["neighbor_ids"],
                                         batch["neighbor_text_mask"],
                                         mask_neighbors(batch["neighbor_mask"], r["keep_neighbors"]))
    x_t, target = training_targets(batch["images"], r["t"], r["noise"], schedule, prediction)
    pred = model(x_t, r["t"], ids, text_mask, neighbors).astype(jnp.float32)
    return weighted_mse(pred, target, r["t"], schedule, prediction, gamma, batch.get("loss_weight"))

  grad_fn = jax.value_and_grad(loss_fn)

  def loss_and_grads(params, frozen, batch: Batch, r: dict[str, jax.Array]):
    if accum == 1:
      return grad_fn(params, frozen, batch, r)

    def one(carry, micro):
      loss, grads = grad_fn(params, frozen, *micro)
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(one, zeros, _micro_batches((batch, r), accum))
    return loss / accum, jax.tree.map(lambda g: g / accum, grads)

  def encode_latents(state: TrainState, images: jax.Array, rng: jax.Array) -> jax.Array:
    """Pixels -> the latents a latent model denoises: a posterior sample of the frozen VAE, on device."""
    vae = nnx.merge(graphdef, state.params, state.frozen).vae
    return jax.lax.stop_gradient(vae.encode_latents(images, rng))

  def step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, dict]:
    if latent:
      rng, vae_rng = jax.random.split(rng)
      batch = dict(batch, images=encode_latents(state, batch["images"], vae_rng))
    loss, grads = loss_and_grads(state.params, state.frozen, batch, draws(rng, batch))
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
    keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = {"loss": loss, "grad_norm": grad_norm, "nonfinite": ~finite}
    if lr_schedule is not None:
      metrics["lr"] = lr_schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=keep_old(params, state.params),
                              opt_state=keep_old(opt_state, state.opt_state),
                              ema=None if ema is None else keep_old(ema, state.ema))
    return new_state, metrics

  return step


def step_rng(state: TrainState) -> jax.Array:
  """The key of the step the state is at: a pure function of the run's seed and the step number."""
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def build_trainer(cfg: mlc.ConfigDict, model: SuTIModel, schedule: Schedule):
  """Single-device convenience: optimizer + state + jitted step(state, batch, rng) for a model built from cfg."""

  tx, lr = make_optimizer(cfg.train)
  graphdef, state = create_train_state(model, tx, cfg)
  null_ids, null_mask = null_text(model, 1)
  step = make_train_step(graphdef, tx, schedule, cfg, jnp.asarray(null_ids), jnp.asarray(null_mask), lr)
  return graphdef, state, jax.jit(step, donate_argnums=0)
