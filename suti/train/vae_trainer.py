"""Training a VAE (diffusers' AutoencoderKL layout) on toy renders: `suti train --config configs/toy_vae.py`.

The config says `train.kind = "vae"`. Batches are renders of the toy world's train-split subjects in random
contexts, drawn from (train.seed, step), so a resumed run sees exactly the batches it would have seen. The loss is
Stable Diffusion's autoencoder loss without its perceptual and adversarial terms: per-pixel L1 of the
reconstruction of a posterior sample, plus `vae.kl_weight` times the KL to N(0, 1) (both summed per image, then
divided by the pixels per image so the learning rate does not depend on the image size).

The workdir holds Orbax checkpoints (resumable), metrics.jsonl, and at the end:
  vae/           the diffusers vae/ folder (what `vae.checkpoint` and AutoencoderKL.from_pretrained read), with
                 shift_factor = mean and scaling_factor = 1 / std of the train renders' latents (as SD 1.5 chose
                 its 0.18215; SD 3 added the shift)
  reconstructions.png  held-out renders above their reconstructions
  report.json    reconstruction PSNR on held-out subjects' renders, the latent statistics, steps and time, and
                 (eval.clip_checkpoint) the eval's toy identity metric on those renders before and after
                 encode-decode: what the VAE costs the identity a latent model can show at best
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from suti.checkpoint.store import Checkpointer
from suti.core.atomic_io import atomic_write_json
from suti.core.image_ops import to_model_range, to_uint8
from suti.core.paths import resolve_path
from suti.core.png import save_png
from suti.embed.clip import ClipEmbedder
from suti.models.convert_vae import save_diffusers_vae
from suti.models.model import vae_config
from suti.models.vae import AutoencoderKL, VAEConfig, kl_to_standard_normal, posterior_sample
from suti.toy.truth import distractors, reference_renders
from suti.toy.world import Subject, render, sample_context, subjects_of_split
from suti.train.metrics_writer import MetricsWriter
from suti.train.optim import make_optimizer
from suti.viz.contact_sheet import contact_sheet

@flax.struct.dataclass
class VAETrainState:
  step: jax.Array
  params: Any
  opt_state: optax.OptState


def vae_architecture(cfg: mlc.ConfigDict) -> VAEConfig:
  config = vae_config(cfg)
  if config is None:
    raise ValueError("train.kind='vae' trains the config's vae section: set vae.enabled=True")
  return config


def initial_state(cfg: mlc.ConfigDict) -> tuple[nnx.GraphDef, optax.GradientTransformation, optax.Schedule,
                                                 VAETrainState]:
  """(graphdef, optimizer, lr schedule, step-0 state) of the config's VAE: what a run starts from, and the
  template its checkpoints restore into."""
  vae = AutoencoderKL(vae_architecture(cfg), rngs=nnx.Rngs(int(cfg.train.seed)))
  graphdef, params = nnx.split(vae, nnx.Param)
  tx, lr = make_optimizer(cfg.train)
  return graphdef, tx, lr, VAETrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


# Random streams of toy_renders: the training batches, the held-out PSNR images, the latent-statistics images.
TRAIN_STREAM, HELDOUT_STREAM, STATS_STREAM = 0, 1, 2


def toy_renders(seed: int, index: int, count: int, size: int, split: str = "train",
                stream: int = TRAIN_STREAM) -> np.ndarray:
  """`count` renders (float32 [count, size, size, 3] in [-1, 1]) of random `split` subjects in random contexts;
  the same (seed, index, stream) always gives the same images."""
  return to_model_range(toy_renders_of(seed, index, count, size, split, stream)[0])


def toy_renders_of(seed: int, index: int, count: int, size: int, split: str = "train",
                   stream: int = TRAIN_STREAM) -> tuple[np.ndarray, list[Subject]]:
  """toy_renders as uint8, with the subject of each image."""
  rng = np.random.default_rng([int(seed), int(index), int(stream)])
  pool = subjects_of_split(split)
  subjects = [pool[i] for i in rng.integers(0, len(pool), count)]
  return np.stack([render(subject, sample_context(rng), size=size) for subject in subjects]), subjects


def vae_loss(vae: AutoencoderKL, images: jax.Array, rng: jax.Array, kl_weight: float) -> tuple[jax.Array, dict]:
  mean, logvar = vae.encode(images)
  recon = vae.decode(posterior_sample(mean, logvar, rng))
  pixels = float(np.prod(images.shape[1:]))
  l1 = jnp.mean(jnp.abs(recon - images))
  kl = jnp.mean(kl_to_standard_normal(mean, logvar)) / pixels
  return l1 + kl_weight * kl, {"l1": l1, "kl_per_pixel": kl}


def make_vae_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, kl_weight: float):
  def step(state: VAETrainState, images: jax.Array, rng: jax.Array) -> tuple[VAETrainState, dict]:
    def loss_fn(params):
      return vae_loss(nnx.merge(graphdef, params), images, rng, kl_weight)

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return (VAETrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state),
            dict(parts, loss=loss, grad_norm=optax.global_norm(grads)))

  return jax.jit(step, donate_argnums=0)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """PSNR in dB per image of two batches in [-1, 1] (peak-to-peak 2)."""
  mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64))**2, axis=(1, 2, 3))
  return 10.0 * np.log10(4.0 / np.maximum(mse, 1e-12))


def evaluate(vae: AutoencoderKL, cfg: mlc.ConfigDict, workdir: str) -> dict:
  """Reconstruction PSNR (posterior mean) on held-out subjects' renders, the train renders' latent statistics,
  and with a CLIP (eval.clip_checkpoint) the toy identity metric of the renders before and after encode-decode;
  writes workdir/reconstructions.png (32 of the renders above their reconstructions)."""
  size, n = int(cfg.data.image_size), int(cfg.eval.images)
  encode = jax.jit(lambda v, x: v.encode(x)[0])
  decode = jax.jit(lambda v, z: jnp.clip(v.decode(z), -1.0, 1.0))
  originals, subjects = toy_renders_of(int(cfg.train.seed), 0, n, size, split="heldout", stream=HELDOUT_STREAM)
  held_out = to_model_range(originals)
  recon = np.concatenate([np.asarray(decode(vae, encode(vae, held_out[i:i + 64]))) for i in range(0, n, 64)])
  train_renders = toy_renders(int(cfg.train.seed), 0, n, size, stream=STATS_STREAM)
  latents = np.concatenate([np.asarray(encode(vae, train_renders[i:i + 64])) for i in range(0, n, 64)])
  os.makedirs(workdir, exist_ok=True)
  rows = range(0, min(n, 32), 8)
  save_png(os.path.join(workdir, "reconstructions.png"), contact_sheet(
      [[list(originals[i:i + 8]), list(to_uint8(recon[i:i + 8]))] for i in rows],
      captions=["held-out renders | after encode-decode"] * len(rows), scale=4))
  scores = psnr(recon, held_out)
  report = {"heldout_psnr_db": float(scores.mean()), "heldout_psnr_db_p10": float(np.percentile(scores, 10)),
            "heldout_images": n, "latent_mean": float(latents.mean()), "latent_std": float(latents.std()),
            "latent_shape": list(latents.shape[1:])}
  if cfg.eval.get("clip_checkpoint", ""):
    clip = ClipEmbedder(cfg.eval.clip_model, resolve_path(cfg.eval.clip_checkpoint))
    report.update(identity_fidelity(clip, originals, to_uint8(recon), subjects, int(cfg.eval.identity_candidates)))
  return report


def identity_fidelity(clip: ClipEmbedder, originals: np.ndarray, reconstructions: np.ndarray,
                      subjects: list[Subject], candidates: int, references: int = 4) -> dict:
  """The eval's toy identity metric on true renders and on their encode-decode reconstructions: how often the
  true subject ranks first among itself and `candidates - 1` same-class held-out distractors (mean CLIP cosine to
  each candidate's reference renders), and the CLIP cosine between each render and its reconstruction."""
  size = originals.shape[1]
  refs: dict[str, np.ndarray] = {}

  def reference(subject: Subject) -> np.ndarray:
    if subject.id not in refs:
      refs[subject.id] = clip.images(reference_renders(subject, references, size))
    return refs[subject.id]

  before, after = clip.images(list(originals)), clip.images(list(reconstructions))
  top1 = {"before": [], "after": []}
  for i, subject in enumerate(subjects):
    pool = [subject] + distractors(subject, candidates - 1)
    for name, emb in (("before", before[i]), ("after", after[i])):
      sims = [float((reference(s) @ emb).mean()) for s in pool]
      top1[name].append(int(np.argmax(sims) == 0))
  return {"identity_top1_true_renders": float(np.mean(top1["before"])),
          "identity_top1_after_encode_decode": float(np.mean(top1["after"])),
          "clip_cosine_render_vs_reconstruction": float(np.mean(np.sum(before * after, axis=1))),
          "identity_candidates": int(candidates)}


def train_vae(cfg: mlc.ConfigDict, workdir: str, *, max_steps: int | None = None, progress: bool = True) -> dict:
  """Trains (or resumes) to train.steps; writes workdir/vae and workdir/report.json when done; returns the
  report (empty when stopped early by max_steps)."""
  os.makedirs(workdir, exist_ok=True)
  config = vae_architecture(cfg)
  size = int(cfg.data.image_size)
  if size % config.downsample_factor:
    raise ValueError(f"data.image_size {size} is not a multiple of the VAE's downsampling factor "
                     f"{config.downsample_factor}")
  graphdef, tx, lr, state = initial_state(cfg)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(cfg.train.keep_checkpoints),
                              async_save=False)
  restored = checkpointer.restore(state)
  if restored is not None:
    state = restored[1]
  start, total = int(state.step), int(cfg.train.steps)
  end = total if max_steps is None else min(total, start + int(max_steps))
  step_fn = make_vae_step(graphdef, tx, float(cfg.vae.kl_weight))
  writer = MetricsWriter(workdir, resume_step=start or None, tensorboard=False)
  meta = {"config": json.loads(cfg.to_json_best_effort()), "kind": "vae"}
  batch, seed, key = int(cfg.train.batch_size), int(cfg.train.seed), jax.random.key(int(cfg.train.seed))
  began = time.perf_counter()
  with tqdm(total=end - start, desc="train vae", unit="step", disable=not progress) as bar:
    for step in range(start, end):
      state, metrics = step_fn(state, jnp.asarray(toy_renders(seed, step, batch, size)), jax.random.fold_in(key, step))
      bar.update(1)
      if (step + 1) % int(cfg.train.log_every) == 0 or step + 1 == end:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        writer.write_scalars(step + 1, dict(values, lr=float(lr(step))))
        bar.set_postfix(l1=f"{values['l1']:.4f}")
      if (step + 1) % int(cfg.train.checkpoint_every) == 0 or step + 1 == end:
        checkpointer.save(step + 1, state, dict(meta, step=step + 1))
  checkpointer.close()
  writer.close()
  if int(state.step) < total:
    return {}
  trained = nnx.merge(graphdef, state.params)
  report = evaluate(trained, cfg, workdir)
  # Latents the diffusion model sees, (z - shift_factor) * scaling_factor, get zero mean and unit variance over the
  # train renders: SD 1.5 chose its scaling_factor so, SD 3 added the shift (the toy's latents have mean -1.3, std 5).
  normalised = dataclasses.replace(config, scaling_factor=1.0 / report["latent_std"], shift_factor=report["latent_mean"])
  shipped_graph = nnx.split(nnx.eval_shape(lambda: AutoencoderKL(normalised, rngs=nnx.Rngs(0))))[0]
  shipped = nnx.merge(shipped_graph, state.params)
  save_diffusers_vae(shipped, os.path.join(workdir, "vae"))
  report.update(steps=total, seconds_this_invocation=round(time.perf_counter() - began, 1),
                scaling_factor=shipped.config.scaling_factor, shift_factor=shipped.config.shift_factor,
                params=int(sum(np.size(x) for x in jax.tree.leaves(state.params))))
  atomic_write_json(os.path.join(workdir, "report.json"), report)
  return report
