"""Toy SuTI apprentice at 32x32 in latent space: configs/toy_latent.py plus neighbors, as configs/toy_suti.py adds
them to configs/toy.py. The demos are encoded to latents by the frozen toy VAE, then go through the UNet's own down
path (the 4x4 latent mid-block map: 16 tokens per demo).

  suti train --config configs/toy_latent_suti.py --workdir /tmp/toy_latent_suti \
      --config.data.shards='/tmp/pipe32/icl/*.tar' --config.train.init_from=/tmp/toy_latent_base
"""
import ml_collections as mlc

from configs import toy_latent, toy_suti


def get_config() -> mlc.ConfigDict:
  c = toy_latent.get_config()
  apprentice = toy_suti.get_config()
  for key in ("num_neighbors", "neighbor_timestep", "neighbor_token_resolutions", "neighbor_attn_resolutions"):
    c.model[key] = apprentice.model[key]
  c.diffusion.p_drop_neighbors = apprentice.diffusion.p_drop_neighbors
  c.sample.text_scale = apprentice.sample.text_scale
  c.sample.neighbor_scale = apprentice.sample.neighbor_scale
  c.train.steps = apprentice.train.steps
  return c
