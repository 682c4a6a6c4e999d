"""Train-step throughput of our UNet against diffusers' PyTorch UNet2DConditionModel, same shape, one run.

  python benchmarks/unet_step.py [--config configs/toy.py] [--batch 32] [--steps 20] [--image-size 32]

Both sides run one full training step per iteration (forward, eps-MSE loss, backward, AdamW update) on the
same architecture, batch and resolution, on this machine's CPU; each side is timed after its warm-up
(compilation for JAX). Our side also runs with 3 neighbors through the down path to price the apprentice.
On this 2-core machine XLA:CPU runs each 2-D convolution on one thread (a lone 3x3 conv measures cpu/wall
1.00, 25 ms where PyTorch's oneDNN takes 11 ms on both cores), and that, not the model code, sets the ratio
here; accelerators are the target of the JAX path. Prints a table, then one JSON line: img_per_s_ours, img_per_s_diffusers, ratio_vs_diffusers,
img_per_s_neighbors, neighbor_train_ratio.
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
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from suti.config import load_config  # noqa: E402
from suti.models.unet import UNet  # noqa: E402
from suti.models.unet_config import UNetConfig  # noqa: E402


def diffusers_kwargs(c: UNetConfig) -> dict:
  """The diffusers UNet2DConditionModel config with our UNet's shape."""
  return dict(sample_size=c.image_size, in_channels=c.in_channels, out_channels=c.out_channels,
              block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
              down_block_types=c.down_block_types, up_block_types=c.up_block_types,
              mid_block_type=c.mid_block_type, attention_head_dim=c.num_attention_heads,
              cross_attention_dim=c.cross_attention_dim, norm_num_groups=c.norm_num_groups,
              norm_eps=c.norm_eps, use_linear_projection=c.use_linear_projection,
              flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift,
              transformer_layers_per_block=c.transformer_layers_per_block,
              resnet_time_scale_shift=c.resnet_time_scale_shift)


def _timed(fn, steps: int, warmup: int) -> float:
  """Seconds per call after `warmup` calls; fn must block until its work is done."""
  for _ in range(warmup):
    fn()
  start = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - start) / steps


def ours_step_time(c: UNetConfig, batch: int, steps: int, context_len: int, neighbors: int = 0) -> float:
  unet = UNet(c, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(unet, nnx.Param)
  tx = optax.adamw(1e-4)
  opt_state = tx.init(params)
  rng = np.random.default_rng(0)
  s = c.image_size
  x = jnp.asarray(rng.standard_normal((batch, s, s, c.in_channels), np.float32))
  noise = jnp.asarray(rng.standard_normal(x.shape, np.float32))
  t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
  ctx = jnp.asarray(rng.standard_normal((batch, context_len, c.cross_attention_dim), np.float32))
  pooled = ctx.mean(1) if c.text_in_time_embedding else None
  nb = None
  if neighbors:
    nb = (jnp.asarray(rng.standard_normal((batch, neighbors, s, s, c.in_channels), np.float32)),
          jnp.broadcast_to(ctx[:, None], (batch, neighbors) + ctx.shape[1:]),
          jnp.ones((batch, neighbors, context_len), bool), jnp.ones((batch, neighbors), bool))

  def loss_fn(params):
    model = nnx.merge(graphdef, params)
    tokens = None
    if nb is not None:
      tokens = model.encode_neighbors(*nb, pooled_texts=None if pooled is None else
                                      jnp.broadcast_to(pooled[:, None], (batch, neighbors) + pooled.shape[1:]))
    pred = model(x, t, ctx, None, neighbors=tokens, pooled_text=pooled)
    return jnp.mean(jnp.square(pred - noise))

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = [params, opt_state]

  def run():
    state[0], state[1], loss = step(state[0], state[1])
    loss.block_until_ready()

  return _timed(run, steps, warmup=2)


def diffusers_step_time(c: UNetConfig, batch: int, steps: int, context_len: int) -> float:
  import suti.core.torch_compat  # noqa: F401  (torchvision on CPU-only torch)
  import torch
  from diffusers import UNet2DConditionModel

  torch.manual_seed(0)
  model = UNet2DConditionModel(**diffusers_kwargs(c))
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  s = c.image_size
  x = torch.randn(batch, c.in_channels, s, s)
  noise = torch.randn_like(x)
  t = torch.randint(0, 1000, (batch,))
  ctx = torch.randn(batch, context_len, c.cross_attention_dim)

  def run():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x, t, encoder_hidden_states=ctx).sample, noise)
    loss.backward()
    opt.step()

  return _timed(run, steps, warmup=2)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/toy.py")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--context-len", type=int, default=32)
  parser.add_argument("--image-size", type=int, default=0, help="override the config's model.image_size")
  args = parser.parse_args()
  cfg = load_config(args.config)
  # diffusers has no "pooled text into the time embedding" of our kind: compare the shared architecture.
  c = UNetConfig.from_config(cfg.model).replace(text_in_time_embedding=False, num_neighbors=0)
  if args.image_size:
    scale = args.image_size // c.image_size  # neighbor maps keep their UNet level
    c = c.replace(image_size=args.image_size,
                  neighbor_token_resolutions=tuple(r * scale for r in c.neighbor_token_resolutions),
                  neighbor_attn_resolutions=tuple(r * scale for r in c.neighbor_attn_resolutions))
  ours = ours_step_time(c, args.batch, args.steps, args.context_len)
  theirs = diffusers_step_time(c, args.batch, args.steps, args.context_len)
  with_nb = ours_step_time(c.replace(num_neighbors=3), args.batch, args.steps, args.context_len, neighbors=3)
  result = {
      "config": args.config, "batch": args.batch, "image_size": c.image_size,
      "img_per_s_ours": round(args.batch / ours, 2), "img_per_s_diffusers": round(args.batch / theirs, 2),
      "ratio_vs_diffusers": round(theirs / ours, 3),
      "img_per_s_neighbors": round(args.batch / with_nb, 2), "neighbor_train_ratio": round(ours / with_nb, 3),
  }
  print(f"ours      {result['img_per_s_ours']:8.1f} img/s")
  print(f"diffusers {result['img_per_s_diffusers']:8.1f} img/s")
  print(f"ours + 3 neighbors {result['img_per_s_neighbors']:8.1f} img/s")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
