"""Toy world at 32x32 in latent space: the toy UNet on 16x16x4 latents of the shipped toy VAE (checkpoints/toy_vae).

The same UNet shape as configs/toy.py (3 levels, attention at 8x8 and 4x4 of the latents), fed the frozen VAE's
latents; samplers end with the VAE's decoder, so it makes 32x32 images. The VAE is configs/toy_vae.py's run
(README, "Shipped toy models"). The apprentice on top of it is configs/toy_latent_suti.py.

  suti data toyweb --out /tmp/toyweb32 --pages 3000 --seed 0 --image-size 32
  suti train --config configs/toy_latent.py --workdir /tmp/toy_latent_base --config.data.shards='/tmp/toyweb32/*.tar'
  suti generate --checkpoint /tmp/toy_latent_base --prompt "a red ball on the beach" --out ball.png
"""
import ml_collections as mlc

from configs import toy, toy_vae


def get_config() -> mlc.ConfigDict:
  c = toy.get_config()
  vae = toy_vae.get_config().vae
  for key in c.vae:
    if key not in ("enabled", "checkpoint"):
      c.vae[key] = vae[key]
  c.vae.enabled = True
  c.vae.checkpoint = "checkpoints/toy_vae"  # a diffusers vae/ folder; its scaling_factor is the one trained
  # The shipped toy VAE's latent normalisation (mean and 1 / std of its latents on train renders), as in
  # checkpoints/toy_vae/config.json: the trainer refuses a vae.checkpoint whose config differs.
  c.vae.scaling_factor = 0.20259893274714966
  c.vae.shift_factor = -1.2769031524658203
  c.model.image_size = 16  # latents: 32x32 images / the VAE's factor 2
  c.model.in_channels = 4
  c.model.out_channels = 4
  c.sample.dynamic_threshold = 0.0  # latents: no pixel thresholding
  return c
