"""The toy VAE: an AutoencoderKL of diffusers' layout for the 32x32 toy world, 4 latent channels at 16x16.

  suti train --config configs/toy_vae.py --workdir /tmp/toy_vae
  cp -r /tmp/toy_vae/vae checkpoints/toy_vae      # what configs/toy_latent.py's vae.checkpoint names

Trained on renders of the toy world's train-split subjects in random contexts (never a held-out subject); the
workdir's report.json gives the reconstruction PSNR on held-out subjects' renders and the latent scaling factor.
Two levels (32 and 64 channels) halve each side: the latent UNet then works at 16x16, as the 16x16 pixel toy does,
and makes 32x32 images.
"""
import ml_collections as mlc

from configs import toy


def get_config() -> mlc.ConfigDict:
  base = toy.get_config()
  c = mlc.ConfigDict()
  c.vae = base.vae
  c.vae.enabled = True
  c.vae.block_out_channels = (32, 64)
  c.vae.layers_per_block = 1
  c.vae.norm_num_groups = 8
  c.vae.sample_size = 32
  c.vae.kl_weight = 1e-6  # Stable Diffusion's autoencoder: reconstruction first, a faint pull toward N(0, 1)

  c.data = mlc.ConfigDict()
  c.data.image_size = 32

  c.train = base.train
  c.train.kind = "vae"  # suti train dispatches on it: the diffusion trainer is the default
  c.train.steps = 3000
  c.train.batch_size = 32
  c.train.lr = 1e-3
  c.train.warmup_steps = 100
  c.train.log_every = 50
  c.train.checkpoint_every = 500

  c.eval = mlc.ConfigDict()
  c.eval.images = 256  # held-out renders for the PSNR of report.json
  # The eval's toy identity metric (configs/eval/toy.py) on those renders before and after encode-decode.
  c.eval.clip_model = "toy-ViT-32"
  c.eval.clip_checkpoint = "checkpoints/toy_clip/open_clip_model.safetensors"
  c.eval.identity_candidates = 10  # as configs/eval/toy.py: the true subject + 9 held-out ones of its class
  return c
