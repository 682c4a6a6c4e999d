"""The UNet (diffusers UNet2DConditionModel layout, NHWC) with SuTI's neighbor encoding and attention."""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from suti.models.embeddings import TimestepEmbedding, timestep_features
from suti.models.layers import linear
from suti.models.load_weights import load_weights
from suti.models.neighbors import NeighborTokenizer, NeighborTokens, is_neighbor_param
from suti.models.resnet import GroupNorm, conv3x3
from suti.models.unet_blocks import DownBlock, MidBlock, UpBlock
from suti.models.unet_config import UNetConfig


class UNet(nnx.Module):
  """Text-conditioned diffusion UNet; with `config.num_neighbors > 0` also a SuTI apprentice.

  Parameter names follow diffusers (conv_in, time_embedding.linear_1, down_blocks[i].resnets[j], ...), so
  `suti.models.convert_diffusers` maps a Stable Diffusion checkpoint onto it key by key. Neighbor layers live
  under attribute names containing "neighbor" (`neighbor_tokenizer`, `*.neighbor_attentions`).
  """

  def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = jnp.dtype(config.dtype)
    self.dtype = dtype
    ch = config.block_out_channels
    n = config.num_levels
    temb = config.time_embed_dim
    heads = config.heads_per_level
    tlayers = config.transformer_layers_per_level
    common = dict(context_dim=config.cross_attention_dim, groups=config.norm_num_groups, eps=config.norm_eps,
                  time_scale_shift=config.resnet_time_scale_shift, dtype=dtype, rngs=rngs)
    token_dim = config.neighbor_token_dim if config.num_neighbors > 0 else None

    self.conv_in = conv3x3(config.in_channels, ch[0], dtype=dtype, rngs=rngs)
    self.time_embedding = TimestepEmbedding(ch[0], temb, dtype=dtype, rngs=rngs)
    # Pooled text added to the time embedding (not in SD; Imagen-style pooled conditioning, which helps small models).
    self.text_time_embedding = (linear(config.cross_attention_dim, temb, dtype=dtype, rngs=rngs)
                                if config.text_in_time_embedding else None)

    down = []
    for i, kind in enumerate(config.down_block_types):
      down.append(DownBlock(ch[max(i - 1, 0)], ch[i], temb, num_layers=config.layers_per_block,
                            with_attention=kind == "CrossAttnDownBlock2D", add_downsample=i < n - 1,
                            heads=heads[i], transformer_layers=tlayers[i], **common))
    self.down_blocks = nnx.List(down)

    self.mid_block = MidBlock(ch[-1], temb, heads=heads[-1], transformer_layers=tlayers[-1],
                              neighbor_token_dim=self._neighbor_dim_at(config.mid_resolution, token_dim), **common)

    up = []
    rch, rheads, rtlayers = ch[::-1], heads[::-1], tlayers[::-1]
    for i, kind in enumerate(config.up_block_types):
      up.append(UpBlock(rch[min(i + 1, n - 1)], rch[max(i - 1, 0)], rch[i], temb,
                        num_layers=config.layers_per_block + 1, with_attention=kind == "CrossAttnUpBlock2D",
                        add_upsample=i < n - 1, heads=rheads[i], transformer_layers=rtlayers[i],
                        neighbor_token_dim=self._neighbor_dim_at(config.up_block_resolution(i), token_dim),
                        **common))
    self.up_blocks = nnx.List(up)

    self.conv_norm_out = GroupNorm(config.norm_num_groups, ch[0], eps=config.norm_eps, dtype=dtype)
    self.conv_out = conv3x3(ch[0], config.out_channels, dtype=dtype, rngs=rngs)

    if token_dim:
      sizes = config.neighbor_token_resolutions
      self.neighbor_tokenizer = NeighborTokenizer(sizes, [self._channels_at(r) for r in sizes], token_dim,
                                                  config.num_neighbors, dtype=dtype, rngs=rngs)
    else:
      self.neighbor_tokenizer = None

  # Construction helpers --------------------------------------------------------------------------------
  def _neighbor_dim_at(self, resolution: int, token_dim: int | None) -> int | None:
    return token_dim if token_dim and resolution in self.config.neighbor_attn_resolutions else None

  def _channels_at(self, resolution: int) -> int:
    for level in range(self.config.num_levels):
      if self.config.level_resolution(level) == resolution:
        return self.config.block_out_channels[level]
    raise ValueError(f"no feature map of size {resolution} in this UNet")

  # Shared pieces of the forward pass -------------------------------------------------------------------
  def _check_images(self, x: jax.Array, what: str) -> None:
    c = self.config
    want = (c.image_size, c.image_size, c.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
      raise ValueError(f"{what} must have shape [B, {want[0]}, {want[1]}, {want[2]}] (NHWC), got {tuple(x.shape)}")

  def _check_context(self, context: jax.Array, mask: jax.Array | None, batch: int, what: str) -> None:
    d = self.config.cross_attention_dim
    if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != d:
      raise ValueError(f"{what} must have shape [{batch}, L, {d}], got {tuple(context.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(context.shape[:2]):
      raise ValueError(f"the mask of {what} must have shape {tuple(context.shape[:2])}, got {tuple(mask.shape)}")

  def _time_embedding(self, t: jax.Array, pooled_text: jax.Array | None, batch: int) -> jax.Array:
    t = jnp.asarray(t)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != batch):
      raise ValueError(f"timesteps must be a scalar or have shape [{batch}], got {tuple(t.shape)}")
    t = jnp.broadcast_to(t, (batch,))
    c = self.config
    emb = self.time_embedding(timestep_features(t, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos,
                                                freq_shift=c.freq_shift).astype(self.dtype))
    if self.text_time_embedding is not None:
      if pooled_text is None:
        raise ValueError("pooled_text [B, cross_attention_dim] is required: config.text_in_time_embedding is True")
      if pooled_text.shape != (batch, c.cross_attention_dim):
        raise ValueError(f"pooled_text must have shape [{batch}, {c.cross_attention_dim}], "
                         f"got {tuple(pooled_text.shape)}")
      emb = emb + self.text_time_embedding(pooled_text.astype(self.dtype))
    return emb

  # Public API ------------------------------------------------------------------------------------------
  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array, context_mask: jax.Array | None = None,
               neighbors: NeighborTokens | None = None, pooled_text: jax.Array | None = None) -> jax.Array:
    """x [B,H,W,C], t [B] int, context [B,L,D], context_mask [B,L] bool -> [B,H,W,out_channels] float32."""
    self._check_images(x, "x")
    b = x.shape[0]
    self._check_context(context, context_mask, b, "context")
    if neighbors is not None:
      if self.neighbor_tokenizer is None:
        raise ValueError("neighbors were given but this UNet has no neighbor layers (model.num_neighbors = 0)")
      if neighbors.tokens.shape[0] != b or neighbors.tokens.shape[-1] != self.config.neighbor_token_dim:
        raise ValueError(f"neighbors.tokens must have shape [{b}, N, {self.config.neighbor_token_dim}], "
                         f"got {tuple(neighbors.tokens.shape)}")
    context = context.astype(self.dtype)
    temb_act = jax.nn.silu(self._time_embedding(t, pooled_text, b))

    h = self.conv_in(x.astype(self.dtype))
    skips = [h]
    for block in self.down_blocks:
      h, block_skips = block(h, temb_act, context, context_mask)
      skips.extend(block_skips)
    h = self.mid_block(h, temb_act, context, context_mask, neighbors)
    for block in self.up_blocks:
      count = len(block.resnets)
      h = block(h, skips[-count:], temb_act, context, context_mask, neighbors)
      skips = skips[:-count]
    h = self.conv_out(jax.nn.silu(self.conv_norm_out(h)))
    return h.astype(jnp.float32)

  def encode_neighbors(self, images: jax.Array, contexts: jax.Array, context_masks: jax.Array | None,
                       neighbor_mask: jax.Array, pooled_texts: jax.Array | None = None) -> NeighborTokens:
    """Neighbors (clean images [B,K,H,W,C] with their captions) -> NeighborTokens [B, K*T, D_tok].

    Runs the UNet's own conv_in / down blocks / mid block at timestep `config.neighbor_timestep`. The result does
    not depend on x_t or t: compute it once per generation and pass it to every denoising step.
    """
    c = self.config
    if self.neighbor_tokenizer is None:
      raise ValueError("this UNet has no neighbor layers (model.num_neighbors = 0); cannot encode neighbors")
    if images.ndim != 5:
      raise ValueError(f"neighbor images must have shape [B, K, H, W, C], got {tuple(images.shape)}")
    b, k = images.shape[:2]
    if k > c.num_neighbors:
      raise ValueError(f"got {k} neighbors but the model takes at most model.num_neighbors = {c.num_neighbors}")
    if neighbor_mask.shape != (b, k):
      raise ValueError(f"neighbor_mask must have shape [{b}, {k}], got {tuple(neighbor_mask.shape)}")
    if contexts.ndim != 4 or contexts.shape[:2] != (b, k):
      raise ValueError(f"neighbor contexts must have shape [{b}, {k}, L, D], got {tuple(contexts.shape)}")
    flat_images = images.reshape((b * k,) + images.shape[2:])
    self._check_images(flat_images, "neighbor images (flattened to [B*K, H, W, C])")
    flat_context = contexts.reshape((b * k,) + contexts.shape[2:])
    flat_mask = None if context_masks is None else context_masks.reshape((b * k,) + context_masks.shape[2:])
    self._check_context(flat_context, flat_mask, b * k, "neighbor contexts (flattened to [B*K, L, D])")
    flat_context = flat_context.astype(self.dtype)
    flat_pooled = None if pooled_texts is None else pooled_texts.reshape(b * k, -1)

    t = jnp.full((b * k,), c.neighbor_timestep, jnp.int32)
    temb_act = jax.nn.silu(self._time_embedding(t, flat_pooled, b * k))
    wanted = set(c.neighbor_token_resolutions)
    maps: dict[int, jax.Array] = {}
    h = self.conv_in(flat_images.astype(self.dtype))
    for level, block in enumerate(self.down_blocks):
      if not (wanted - set(maps)):
        break  # every requested map is taken: skip the rest of the encoder
      h, block_skips = block(h, temb_act, flat_context, flat_mask)
      size = c.level_resolution(level)
      if size in wanted and size != c.mid_resolution:
        maps[size] = block_skips[c.layers_per_block - 1]  # the block output before its downsampler
    if c.mid_resolution in wanted:
      maps[c.mid_resolution] = self.mid_block(h, temb_act, flat_context, flat_mask)
    return self.neighbor_tokenizer([maps[r] for r in c.neighbor_token_resolutions], neighbor_mask)


def _path_size(leaf: Any) -> int:
  return int(math.prod(leaf.shape))


def count_params(config: UNetConfig) -> dict[str, int]:
  """Parameter counts without allocating: {"total": N, <top-level block>: n, ..., "neighbor_layers": n}.

  Neighbor parameters are counted under "neighbor_layers" only (not inside mid_block / up_blocks), so the
  per-block figures sum to the total.
  """
  abstract = nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0)))
  counts: dict[str, int] = {"total": 0}
  for path, leaf in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    size = _path_size(leaf.get_value() if hasattr(leaf, "get_value") else leaf.value)
    key = "neighbor_layers" if is_neighbor_param(path) else str(path[0])
    counts[key] = counts.get(key, 0) + size
    counts["total"] += size
  order = ["total", "time_embedding", "text_time_embedding", "conv_in", "down_blocks", "mid_block", "up_blocks",
           "conv_norm_out", "conv_out", "neighbor_layers"]
  return {key: counts[key] for key in sorted(counts, key=lambda k: order.index(k) if k in order else len(order))}


def load_base_into_apprentice(apprentice: UNet, base_params: nnx.State | UNet) -> None:
  """Copies every parameter of a base UNet (or its nnx.State) into an apprentice; neighbor layers keep their
  fresh (zero-output) values. Raises ValueError on a missing path or a shape mismatch."""
  if isinstance(base_params, nnx.Module):
    base_params = nnx.state(base_params, nnx.Param)
  load_weights(apprentice, nnx.to_pure_dict(base_params), source="base UNet")
