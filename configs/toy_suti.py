"""Toy SuTI apprentice at 16x16: the toy base UNet plus neighbor encoding and neighbor attention.

Each of up to 3 demos goes through the base UNet's own down blocks and mid block at t=0; its 4x4 mid-block map
becomes 16 tokens; neighbor attention (zero-initialized) sits in the mid block and the 4x4 up block.

  suti info --config configs/toy_suti.py
  suti train --config configs/toy_suti.py --workdir /tmp/toy_suti --config.data.shards='/tmp/pipe/icl/*.tar' \
      --config.train.init_from=/tmp/toy_base

train.init_from names a base run (its workdir or one checkpoint step): its EMA weights initialise every layer the
two models share; the neighbor layers start fresh with zero output projections, so step 0 is the base model.
checkpoints/toy_suti is this config's run on the ICL shards of a 400-page crawl (3,000 steps, 50 minutes on a shared
2-core machine; README, "Shipped toy models").
"""
import ml_collections as mlc

from configs import toy


def get_config() -> mlc.ConfigDict:
  c = toy.get_config()
  c.model.num_neighbors = 3
  c.model.neighbor_timestep = 0
  c.model.neighbor_token_resolutions = (4,)
  c.model.neighbor_attn_resolutions = (4,)
  c.diffusion.p_drop_neighbors = 0.1
  # One scale for text and demos: joint guidance then needs two guided rows per step, as plain text-to-image does
  # (separate scales add a third). Picked on development subjects (README, Evaluation): the strongest identity whose
  # CLIP-T stays within 4% of text-only; on held-out subjects 0.94x DreamBooth's identity, CLIP-T 4.5% below.
  c.sample.text_scale = 2.25
  c.sample.neighbor_scale = 2.25
  # The ICL shards are small (1,337 examples from a 400-page crawl) and the shared layers start from the base.
  c.train.steps = 3000
  return c
