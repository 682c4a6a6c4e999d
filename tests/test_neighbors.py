"""Neighbor encoding and neighbor attention: exact base equivalence, masking, padding and caching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from suti.models.neighbors import NeighborTokens, is_neighbor_param
from suti.models.unet import UNet, load_base_into_apprentice
from suti.models.unet_config import UNetConfig
from shared_fixtures import tiny_unet_config

K_MAX = 4


def tiny_config(**changes) -> UNetConfig:
  """Tiny apprentice: tokens from the 4x4 mid-block map and the 8x8 down-block map."""
  defaults = dict(num_neighbors=K_MAX, neighbor_token_resolutions=(4, 8), neighbor_attn_resolutions=(4, 8))
  return tiny_unet_config(**{**defaults, **changes})


def target_inputs(cfg: UNetConfig, batch: int = 2, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, cfg.image_size, cfg.image_size, cfg.in_channels)).astype(np.float32)
  t = np.array([5, 700][:batch], np.int32)
  context = rng.standard_normal((batch, 5, cfg.cross_attention_dim)).astype(np.float32)
  mask = np.ones((batch, 5), bool)
  pooled = rng.standard_normal((batch, cfg.cross_attention_dim)).astype(np.float32)
  return x, t, context, mask, pooled


def neighbor_inputs(cfg: UNetConfig, k: int, batch: int = 2, seed: int = 1):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (batch, k, cfg.image_size, cfg.image_size, cfg.in_channels)).astype(np.float32)
  contexts = rng.standard_normal((batch, k, 5, cfg.cross_attention_dim)).astype(np.float32)
  context_masks = np.ones((batch, k, 5), bool)
  context_masks[:, :, 4:] = False
  pooled = rng.standard_normal((batch, k, cfg.cross_attention_dim)).astype(np.float32)
  return images, contexts, context_masks, np.ones((batch, k), bool), pooled


def pad_neighbors(arrays, k_max: int):
  """Pads the K axis of every neighbor input to k_max with zeros (mask False)."""
  return tuple(np.concatenate([a, np.zeros((a.shape[0], k_max - a.shape[1]) + a.shape[2:], a.dtype)], axis=1)
               for a in arrays)


def perturb_neighbor_layers(model: UNet, seed: int = 3) -> None:
  """Stands in for training: random values in every neighbor parameter (zero-initialised ones included)."""
  params = nnx.state(model, is_neighbor_param)
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  leaves = [leaf + 0.2 * rng.standard_normal(leaf.shape).astype(np.float32) for leaf in leaves]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))


@pytest.fixture(scope="module")
def apprentice():
  """A 'trained' apprentice (random neighbor layers) and jitted encode / denoise taking the state explicitly,
  so any apprentice of the same config reuses the compiled programs."""
  model = UNet(tiny_config(), rngs=nnx.Rngs(1))
  perturb_neighbor_layers(model)
  graphdef, state = nnx.split(model)
  encode_with = jax.jit(lambda s, *a: nnx.merge(graphdef, s).encode_neighbors(*a))
  denoise_with = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))

  def encode_and_denoise(s, x, t, context, mask, pooled, *neighbor_args):
    m = nnx.merge(graphdef, s)
    return m(x, t, context, mask, m.encode_neighbors(*neighbor_args), pooled)

  return dict(model=model, encode_with=encode_with, denoise_with=denoise_with,
              encode=lambda *a: encode_with(state, *a), denoise=lambda *a: denoise_with(state, *a),
              fused=jax.jit(lambda *a: encode_and_denoise(state, *a)))


def test_fresh_apprentice_with_base_weights_is_exactly_the_base_model(apprentice):
  base = UNet(tiny_config(num_neighbors=0), rngs=nnx.Rngs(0))
  fresh = UNet(tiny_config(), rngs=nnx.Rngs(7))
  load_base_into_apprentice(fresh, base)
  x, t, context, mask, pooled = target_inputs(base.config)
  neighbor_args = neighbor_inputs(base.config, 2)

  bg, bs = nnx.split(base)
  want = np.asarray(jax.jit(lambda s, *a: nnx.merge(bg, s)(*a))(bs, x, t, context, mask, None, pooled))
  fresh_state = nnx.state(fresh)
  tokens = apprentice["encode_with"](fresh_state, *neighbor_args)
  assert np.abs(np.asarray(tokens.tokens)).max() > 0  # real neighbor tokens, attended with zero output
  with_tokens = apprentice["denoise_with"](fresh_state, x, t, context, mask, tokens, pooled)
  np.testing.assert_array_equal(np.asarray(with_tokens), want)
  without = apprentice["denoise_with"](fresh_state, x, t, context, mask, None, pooled)
  np.testing.assert_array_equal(np.asarray(without), want)


def test_base_parameters_are_exactly_the_non_neighbor_parameters():
  base = UNet(tiny_config(num_neighbors=0), rngs=nnx.Rngs(0))
  apprentice = UNet(tiny_config(), rngs=nnx.Rngs(0))
  base_paths = {p for p, _ in nnx.to_flat_state(nnx.state(base, nnx.Param))}
  app_paths = {p for p, _ in nnx.to_flat_state(nnx.state(apprentice, nnx.Param))}
  neighbor_paths = {p for p in app_paths if is_neighbor_param(p)}
  assert neighbor_paths and base_paths == app_paths - neighbor_paths
  names = {".".join(map(str, p)) for p in neighbor_paths}
  assert "mid_block.neighbor_attentions.0.attn.to_out.kernel" in names
  assert "up_blocks.1.neighbor_attentions.1.attn.to_k.kernel" in names  # 8x8 up block
  assert "neighbor_tokenizer.projections.1.kernel" in names  # the 8x8 down-block map's projection
  low_only = UNet(tiny_config(neighbor_attn_resolutions=(4,)), rngs=nnx.Rngs(0))
  names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(low_only, is_neighbor_param))}
  assert any(n.startswith("up_blocks.0.neighbor_attentions") for n in names)
  assert not any(n.startswith("up_blocks.1.neighbor") for n in names)


def test_tokens_shape_and_mask(apprentice):
  cfg = apprentice["model"].config
  images, contexts, cmasks, nmask, pooled = neighbor_inputs(cfg, K_MAX)
  nmask[1, 2] = False
  tokens = apprentice["encode"](images, contexts, cmasks, nmask, pooled)
  per_neighbor = 4 * 4 + 8 * 8
  assert tokens.tokens.shape == (2, K_MAX * per_neighbor, cfg.neighbor_token_dim)
  expected_mask = np.repeat(nmask, per_neighbor, axis=1)
  np.testing.assert_array_equal(np.asarray(tokens.mask), expected_mask)


def test_padding_to_k_max_with_mask_matches_unpadded(apprentice):
  cfg = apprentice["model"].config
  x, t, context, mask, pooled = target_inputs(cfg)
  two = neighbor_inputs(cfg, 2)
  padded = pad_neighbors(two, K_MAX)
  assert padded[3].shape == (2, K_MAX) and not padded[3][:, 2:].any()
  out_two = apprentice["denoise"](x, t, context, mask, apprentice["encode"](*two), pooled)
  out_padded = apprentice["denoise"](x, t, context, mask, apprentice["encode"](*padded), pooled)
  np.testing.assert_allclose(np.asarray(out_padded), np.asarray(out_two), atol=1e-5)
  # The trained neighbor layers do matter: other neighbors give another output.
  other = apprentice["denoise"](x, t, context, mask, apprentice["encode"](*neighbor_inputs(cfg, 2, seed=9)), pooled)
  assert np.abs(np.asarray(other) - np.asarray(out_two)).max() > 1e-3


def test_rows_without_neighbors_get_exactly_the_no_neighbor_output(apprentice):
  cfg = apprentice["model"].config
  x, t, context, mask, pooled = target_inputs(cfg)
  images, contexts, cmasks, nmask, npooled = neighbor_inputs(cfg, 2)
  nmask[0] = False  # row 0: no neighbors at all
  tokens = apprentice["encode"](images, contexts, cmasks, nmask, npooled)
  with_tokens = np.asarray(apprentice["denoise"](x, t, context, mask, tokens, pooled))
  without = np.asarray(apprentice["denoise"](x, t, context, mask, None, pooled))
  assert np.isfinite(with_tokens).all()
  np.testing.assert_array_equal(with_tokens[0], without[0])
  assert np.abs(with_tokens[1] - without[1]).max() > 1e-3
  all_off = NeighborTokens(tokens=tokens.tokens, mask=jnp.zeros_like(tokens.mask))
  np.testing.assert_array_equal(np.asarray(apprentice["denoise"](x, t, context, mask, all_off, pooled)), without)


def test_cached_tokens_equal_encoding_inside_the_call(apprentice):
  cfg = apprentice["model"].config
  x, t, context, mask, pooled = target_inputs(cfg)
  neighbor_args = neighbor_inputs(cfg, 2)
  tokens = apprentice["encode"](*neighbor_args)
  for step_t in (np.array([999, 999], np.int32), np.array([10, 3], np.int32)):  # reuse across steps
    cached = apprentice["denoise"](x, step_t, context, mask, tokens, pooled)
    fused = apprentice["fused"](x, step_t, context, mask, pooled, *neighbor_args)
    # Same math; XLA fuses the two programs differently, hence float32 rounding and not bit equality.
    np.testing.assert_allclose(np.asarray(cached), np.asarray(fused), atol=1e-5)


def test_neighbor_input_errors(apprentice):
  model = apprentice["model"]
  cfg = model.config
  x, t, context, mask, pooled = target_inputs(cfg)
  with pytest.raises(ValueError, match="got 5 neighbors but the model takes at most model.num_neighbors = 4"):
    model.encode_neighbors(*neighbor_inputs(cfg, K_MAX + 1))
  images, contexts, cmasks, nmask, npooled = neighbor_inputs(cfg, 2)
  with pytest.raises(ValueError, match="neighbor images"):
    model.encode_neighbors(images[..., :2], contexts, cmasks, nmask, npooled)
  with pytest.raises(ValueError, match="pooled_text .* is required"):
    model.encode_neighbors(images, contexts, cmasks, nmask)
  base = UNet(tiny_config(num_neighbors=0), rngs=nnx.Rngs(0))
  tokens = NeighborTokens(tokens=jnp.zeros((2, 16, 32)), mask=jnp.ones((2, 16), bool))
  with pytest.raises(ValueError, match="no neighbor layers"):
    base(x, t, context, mask, tokens, pooled)
  with pytest.raises(ValueError, match="no neighbor layers"):
    base.encode_neighbors(images, contexts, cmasks, nmask, npooled)
