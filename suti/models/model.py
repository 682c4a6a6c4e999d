"""SuTIModel: the text encoder, the UNet and (latent models) the VAE together, as training and sampling see them.

The base text-to-image model is the same class with `model.num_neighbors = 0`. Text goes in as token ids
(tokenized on the host by `model.text.tokenize`); neighbors go in as clean images with their own captions and
become `NeighborTokens` once per batch (training) or once per generation (sampling).

A latent model (`vae.enabled`, Stable Diffusion) has a frozen AutoencoderKL under `vae`: the UNet works on its
latents (`model.image_size` is the latent size), and `decode` turns what a sampler returns into images. Every
caller ends sampling through `decode`, so pixel and latent models share one sampler.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx

from suti.models.neighbors import NeighborTokens
from suti.models.text_encoder import build_text_encoder
from suti.models.unet import UNet
from suti.models.unet_config import UNetConfig
from suti.models.vae import AutoencoderKL, VAEConfig

# cfg.vae keys that are settings, not the VAE's shape (VAEConfig fields): on/off, its weights, its training loss.
VAE_SETTINGS = ("enabled", "checkpoint", "kl_weight")


def vae_config(cfg: mlc.ConfigDict) -> VAEConfig | None:
  """The VAE of a latent model (`cfg.vae.enabled`), None for a pixel model (or a config without a vae section)."""
  section = cfg.get("vae")
  if section is None or not section.get("enabled", False):
    return None
  return VAEConfig.from_mapping({k: v for k, v in section.items() if k not in VAE_SETTINGS})


def output_size(cfg: mlc.ConfigDict) -> int:
  """The side of the images a model makes and takes as demos: model.image_size, times the VAE's downsampling
  factor for a latent model."""
  vae = vae_config(cfg)
  return int(cfg.model.image_size) * (vae.downsample_factor if vae else 1)


class SuTIModel(nnx.Module):
  """Text encoder + UNet (+ neighbor layers when model.num_neighbors > 0)."""

  def __init__(self, cfg: mlc.ConfigDict, *, rngs: nnx.Rngs):
    self.unet_config = UNetConfig.from_config(cfg.model)
    self.text = build_text_encoder(cfg.text, rngs=rngs)
    if self.text.width != self.unet_config.cross_attention_dim:
      raise ValueError(f"text encoder width {self.text.width} != model.cross_attention_dim "
                       f"{self.unet_config.cross_attention_dim}")
    self.unet = UNet(self.unet_config, rngs=rngs)
    vae = vae_config(cfg)
    if vae is not None and (vae.latent_channels, vae.latent_channels) != (self.unet_config.in_channels,
                                                                          self.unet_config.out_channels):
      raise ValueError(f"vae.latent_channels {vae.latent_channels} != the UNet's model.in_channels / out_channels "
                       f"({self.unet_config.in_channels} / {self.unet_config.out_channels})")
    self.vae = AutoencoderKL(vae, rngs=rngs) if vae is not None else None

  @property
  def num_neighbors(self) -> int:
    return self.unet_config.num_neighbors

  @property
  def image_size(self) -> int:
    """The side of the images the model makes (pixels; the latent side times the VAE's factor)."""
    factor = self.vae.config.downsample_factor if self.vae is not None else 1
    return self.unet_config.image_size * factor

  @property
  def noise_shape(self) -> tuple[int, int, int]:
    """What the UNet denoises, per image: [side, side, channels] (latents for a latent model)."""
    c = self.unet_config
    return (c.image_size, c.image_size, c.out_channels)

  def decode(self, x0: jax.Array) -> jax.Array:
    """What a sampler returns -> images in model range [-1, 1] (clipped): latents go through the VAE decoder."""
    if self.vae is not None:
      x0 = self.vae.decode_latents(x0)
    return jnp.clip(x0, -1.0, 1.0)

  def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return self.text.tokenize(list(texts))

  def encode_text(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    emb, pooled = self.text(ids, mask)
    return emb, mask, pooled

  def encode_neighbors(self, images: jax.Array, ids: jax.Array, text_mask: jax.Array,
                       neighbor_mask: jax.Array) -> NeighborTokens:
    """images [B,K,H,W,C] (pixels, model range), ids / text_mask [B,K,L], neighbor_mask [B,K] -> NeighborTokens."""
    b, k = ids.shape[:2]
    if self.vae is not None:  # a latent apprentice: demos become latents first, then go through the UNet's down path
      images = self.vae.encode_latents(images.reshape(b * k, *images.shape[2:]))
      images = images.reshape(b, k, *images.shape[1:])
    emb, pooled = self.text(ids.reshape(b * k, -1), text_mask.reshape(b * k, -1))
    return self.unet.encode_neighbors(
        images, emb.reshape(b, k, *emb.shape[1:]), text_mask, neighbor_mask,
        pooled_texts=pooled.reshape(b, k, -1))

  def __call__(self, x_t: jax.Array, t: jax.Array, ids: jax.Array, text_mask: jax.Array,
               neighbors: NeighborTokens | None = None) -> jax.Array:
    emb, mask, pooled = self.encode_text(ids, text_mask)
    return self.unet(x_t, t, emb, mask, neighbors=neighbors, pooled_text=pooled)


def null_text(model: SuTIModel, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Token ids of the empty prompt: the unconditional text used by dropout and guidance."""
  ids, mask = model.tokenize([""])
  return np.repeat(ids, batch_size, 0), np.repeat(mask, batch_size, 0)
