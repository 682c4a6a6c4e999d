"""Few-shot sampling cost: 50 DDIM steps with 3 cached neighbors vs the same model shape without neighbors.

  python benchmarks/sampling.py [--config configs/toy_suti.py] [--batch 4] [--steps 50] [--repeats 3]

Both runs use the same sampler, steps, batch and joint guidance with text_scale = neighbor_scale, where the
apprentice needs the same two guided rows per step as plain classifier-free guidance (e(0,0) and e(c,n)); the
neighbor tokens are computed once per generation, so the ratio should stay near 1. Separate text and neighbor
scales add a third row, e(c,0): that figure is reported too (about 1.5 by construction). Ends with one JSON
line: seconds_plain, seconds_neighbors, neighbor_sampling_ratio (= seconds_neighbors / seconds_plain),
neighbor_sampling_ratio_separate_scales.
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
from suti.infer.sampling import make_sample_fn  # noqa: E402
from suti.models.model import SuTIModel  # noqa: E402


def time_generation(cfg, batch: int, neighbors: int, repeats: int) -> float:
  model = SuTIModel(cfg, rngs=nnx.Rngs(0))
  c = model.unet_config
  graphdef, state = nnx.split(model)
  fn = make_sample_fn(graphdef, make_schedule(cfg.diffusion), cfg.sample, cfg.diffusion.prediction,
                      (c.image_size, c.image_size, c.out_channels))
  ids, mask = (jnp.asarray(a) for a in model.tokenize(["a cup on the beach"] * batch))
  demos = None
  if neighbors:
    rng = np.random.default_rng(0)
    nids, nmask = model.tokenize(["a photo of a cup"] * (batch * neighbors))
    demos = {"images": jnp.asarray(rng.uniform(-1, 1, (batch, neighbors, c.image_size, c.image_size, 3)),
                                   jnp.float32),
             "ids": jnp.asarray(nids.reshape(batch, neighbors, -1)),
             "text_mask": jnp.asarray(nmask.reshape(batch, neighbors, -1)),
             "neighbor_mask": jnp.ones((batch, neighbors), bool)}
  fn(state, ids, mask, demos, jax.random.key(0)).block_until_ready()  # compile
  best = float("inf")
  for r in range(repeats):
    start = time.perf_counter()
    fn(state, ids, mask, demos, jax.random.key(r + 1)).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/toy_suti.py")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  cfg = load_config(args.config)
  k = cfg.model.num_neighbors or 3
  overrides = [("sample.steps", str(args.steps)), ("sample.sampler", "ddim"),
               ("sample.neighbor_scale", str(cfg.sample.text_scale))]
  with_nb = time_generation(load_config(args.config, overrides + [("model.num_neighbors", str(k))]),
                            args.batch, k, args.repeats)
  plain = time_generation(load_config(args.config, overrides + [("model.num_neighbors", "0")]),
                          args.batch, 0, args.repeats)
  separate = time_generation(load_config(args.config, overrides[:2] + [("model.num_neighbors", str(k))]),
                             args.batch, k, args.repeats)
  result = {"config": args.config, "batch": args.batch, "steps": args.steps, "neighbors": k,
            "seconds_plain": round(plain, 3), "seconds_neighbors": round(with_nb, 3),
            "neighbor_sampling_ratio": round(with_nb / plain, 3),
            "neighbor_sampling_ratio_separate_scales": round(separate / plain, 3)}
  print(f"{args.steps} DDIM steps, batch {args.batch}: plain {plain:.2f} s, with {k} cached neighbors "
        f"{with_nb:.2f} s")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
