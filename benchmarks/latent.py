"""The toy train step at 32x32 output: in latent space (the toy VAE's 16x16x4 latents) against in pixel space, one run.

  python benchmarks/latent.py [--batch 32] [--steps 10]

Three steps of the trainer's own `make_train_step` (forward, loss, backward, AdamW, EMA), same UNet shape
(configs/toy.py's), same batch:
  pixel     configs/toy.py at model.image_size 32: the UNet denoises 32x32x3 pixels
  latent    configs/toy_latent.py: 32x32 pixels in, the frozen VAE encodes them on device, the UNet denoises 16x16x4
  cached    the same latent UNet fed 16x16x4 latents computed ahead (what a latent cache would feed it)
The VAE's share of the latent step is 1 - cached / latent; `encode_img_per_s` is the VAE encoder alone (what
writing a cache costs per image, once). Timing is after compilation; weights are random (speed does not depend on
them). Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from suti.config import load_config  # noqa: E402
from suti.diffusion.schedules import make_schedule  # noqa: E402
from suti.models.model import SuTIModel, null_text  # noqa: E402
from suti.train.optim import make_optimizer  # noqa: E402
from suti.train.step import create_train_state, make_train_step  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name: str, overrides=()):
  return load_config(os.path.join(ROOT, "configs", name), list(overrides))


def step_seconds(cfg, images: np.ndarray, steps: int) -> float:
  """Seconds per train step of `cfg`'s model on `images` (after two warm-up steps, which compile)."""
  model = SuTIModel(cfg, rngs=nnx.Rngs(0))
  tx, _ = make_optimizer(cfg.train)
  graphdef, state = create_train_state(model, tx, cfg)
  null_ids, null_mask = null_text(model, 1)
  step = jax.jit(make_train_step(graphdef, tx, make_schedule(cfg.diffusion), cfg, jnp.asarray(null_ids),
                                 jnp.asarray(null_mask)), donate_argnums=0)
  ids, mask = model.tokenize(["a red ball with white stripes on the beach"] * len(images))
  batch = {"images": jnp.asarray(images), "ids": jnp.asarray(ids), "text_mask": jnp.asarray(mask)}
  for i in range(2):
    state, metrics = step(state, batch, jax.random.key(i))
  jax.block_until_ready(metrics["loss"])
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = step(state, batch, jax.random.key(i))
  jax.block_until_ready(metrics["loss"])
  return (time.perf_counter() - start) / steps


def encode_seconds(cfg, images: np.ndarray, repeats: int) -> float:
  vae = SuTIModel(cfg, rngs=nnx.Rngs(0)).vae
  encode = jax.jit(lambda v, x: v.encode_latents(x))
  jax.block_until_ready(encode(vae, images))
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(encode(vae, images))
  return (time.perf_counter() - start) / repeats


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  pixels = rng.uniform(-1, 1, (args.batch, 32, 32, 3)).astype(np.float32)
  latent_cfg = _config("toy_latent.py")
  latents = rng.standard_normal((args.batch, 16, 16, 4)).astype(np.float32)
  cached_cfg = _config("toy_latent.py", [("vae.enabled", "False")])  # the same UNet, fed latents directly
  seconds = {
      "pixel": step_seconds(_config("toy.py", [("model.image_size", "32")]), pixels, args.steps),
      "latent": step_seconds(latent_cfg, pixels, args.steps),
      "cached": step_seconds(cached_cfg, latents, args.steps),
  }
  encode = encode_seconds(latent_cfg, pixels, args.steps)
  rate = {k: args.batch / v for k, v in seconds.items()}
  print(f"{'step':<8} {'s/step':>8} {'img/s':>8}")
  for name in seconds:
    print(f"{name:<8} {seconds[name]:>8.3f} {rate[name]:>8.1f}")
  result = {"batch": args.batch, "img_per_s_pixel32": round(rate["pixel"], 2),
            "img_per_s_latent": round(rate["latent"], 2), "img_per_s_latent_cached": round(rate["cached"], 2),
            "latent_vs_pixel": round(rate["latent"] / rate["pixel"], 3),
            "cached_vs_on_device": round(rate["cached"] / rate["latent"], 3),
            "vae_share_of_latent_step": round(1.0 - seconds["cached"] / seconds["latent"], 3),
            "encode_img_per_s": round(args.batch / encode, 1)}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
