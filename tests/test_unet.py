"""UNet structure, parameter counts, time embedding and input checks."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from suti.config import load_config
from suti.models.embeddings import timestep_features
from suti.models.resnet import ResnetBlock2D
from suti.models.unet import UNet, count_params
from suti.models.unet_config import UNetConfig
from shared_fixtures import tiny_unet_config as tiny_config

SD15_UNET_PARAMS = 859_520_964
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def model_section(name: str):
  return load_config(os.path.join(CONFIGS, name)).model


def inputs(cfg: UNetConfig, batch: int = 2, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, cfg.image_size, cfg.image_size, cfg.in_channels)).astype(np.float32)
  t = rng.integers(0, 1000, batch).astype(np.int32)
  context = rng.standard_normal((batch, 5, cfg.cross_attention_dim)).astype(np.float32)
  mask = np.ones((batch, 5), bool)
  mask[-1, 3:] = False
  pooled = rng.standard_normal((batch, cfg.cross_attention_dim)).astype(np.float32)
  return x, t, context, mask, pooled


def jitted(model):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
  return lambda *a: fn(state, *a)


def test_sd15_parameter_count_is_exact_without_allocating():
  cfg = UNetConfig.from_config(model_section("sd15.py"))
  counts = count_params(cfg)
  assert counts["total"] == SD15_UNET_PARAMS
  assert sum(v for k, v in counts.items() if k != "total") == counts["total"]
  assert set(counts) == {"total", "time_embedding", "conv_in", "down_blocks", "mid_block", "up_blocks",
                         "conv_norm_out", "conv_out"}
  # Known sizes of SD 1.5 pieces: conv_in 4->320 3x3, time MLP 320->1280->1280.
  assert counts["conv_in"] == 4 * 320 * 9 + 320
  assert counts["time_embedding"] == 320 * 1280 + 1280 + 1280 * 1280 + 1280


def test_apprentice_count_adds_only_neighbor_layers():
  base = count_params(tiny_config())
  apprentice = count_params(tiny_config(num_neighbors=3))
  assert apprentice["neighbor_layers"] > 0
  assert apprentice["total"] == base["total"] + apprentice["neighbor_layers"]
  for key in base:
    if key != "total":
      assert apprentice[key] == base[key], key


def test_forward_shape_dtype_and_parameter_names():
  cfg = tiny_config(out_channels=5)
  model = UNet(cfg, rngs=nnx.Rngs(0))
  x, t, context, mask, pooled = inputs(cfg)
  y = jitted(model)(x, t, context, mask, None, pooled)
  assert y.shape == (2, 8, 8, 5) and y.dtype == jnp.float32
  assert np.isfinite(np.asarray(y)).all()
  paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for name in ("conv_in.kernel", "time_embedding.linear_1.kernel", "down_blocks.0.resnets.0.conv1.kernel",
               "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.kernel",
               "down_blocks.0.downsamplers.0.conv.kernel", "mid_block.attentions.0.proj_in.kernel",
               "up_blocks.0.resnets.1.conv_shortcut.kernel", "up_blocks.0.upsamplers.0.conv.kernel",
               "up_blocks.1.resnets.1.time_emb_proj.bias", "conv_norm_out.scale", "conv_out.bias",
               "text_time_embedding.kernel"):
    assert name in paths, name
  assert not any("neighbor" in p for p in paths)


def test_scale_shift_doubles_time_projection_only():
  scale_shift = count_params(tiny_config(resnet_time_scale_shift="scale_shift"))
  default = count_params(tiny_config(resnet_time_scale_shift="default"))
  # Every ResBlock's time_emb_proj grows from temb -> C to temb -> 2C: (temb + 1) * C more parameters each.
  # ResBlock widths of the tiny UNet (16, 32; one layer per level): down 16, 32; mid 32, 32; up 32 x2, 16 x2.
  widths = [16, 32] + [32, 32] + [32, 32, 16, 16]
  assert scale_shift["total"] - default["total"] == (64 + 1) * sum(widths)
  assert scale_shift["conv_in"] == default["conv_in"] and scale_shift["time_embedding"] == default["time_embedding"]


def test_scale_shift_takes_scale_from_the_first_half():
  block = ResnetBlock2D(4, 8, 6, groups=2, eps=1e-5, time_scale_shift="scale_shift", dtype=jnp.float32,
                        rngs=nnx.Rngs(0))
  assert block.time_emb_proj.kernel.shape == (6, 16)
  block.time_emb_proj.kernel[...] = jnp.zeros((6, 16))
  # scale = -1 cancels the normalised map and shift = 0 leaves silu(0) = 0: the residual branch is conv2(0).
  block.time_emb_proj.bias[...] = jnp.concatenate([-jnp.ones(8), jnp.zeros(8)])
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 5, 4)), jnp.float32)
  temb = jnp.ones((2, 6))
  want = block.conv_shortcut(x) + block.conv2.bias[...]
  np.testing.assert_allclose(np.asarray(block(x, temb)), np.asarray(want), rtol=0, atol=1e-6)
  # scale = 0, shift = 0: plain norm2 without time conditioning, which depends on x.
  block.time_emb_proj.bias[...] = jnp.zeros(16)
  assert np.abs(np.asarray(block(x, temb) - want)).max() > 1e-2


def test_context_mask_hides_padded_tokens():
  cfg = tiny_config()
  run = jitted(UNet(cfg, rngs=nnx.Rngs(0)))
  x, t, context, mask, pooled = inputs(cfg)
  noisy = context.copy()
  noisy[-1, 3:] = 100.0  # masked positions of the last row
  a, b = run(x, t, context, mask, None, pooled), run(x, t, noisy, mask, None, pooled)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  c = run(x, t, noisy, np.ones_like(mask), None, pooled)
  assert np.abs(np.asarray(c)[-1] - np.asarray(a)[-1]).max() > 1e-3


def test_timestep_features_closed_form():
  t = jnp.array([0, 7, 999])
  emb = np.asarray(timestep_features(t, 8, flip_sin_to_cos=True, freq_shift=1))
  freqs = np.exp(-math.log(10000.0) * np.arange(4) / 3.0)
  angles = np.array([0, 7, 999])[:, None] * freqs[None]
  np.testing.assert_allclose(emb, np.concatenate([np.cos(angles), np.sin(angles)], 1), rtol=1e-5, atol=1e-4)
  unflipped = np.asarray(timestep_features(t, 8, flip_sin_to_cos=False, freq_shift=1))
  np.testing.assert_array_equal(unflipped[:, :4], emb[:, 4:])


def test_bfloat16_compute_keeps_float32_params():
  cfg = tiny_config(dtype="bfloat16")
  model = UNet(cfg, rngs=nnx.Rngs(0))
  assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
  ref = UNet(cfg.replace(dtype="float32"), rngs=nnx.Rngs(0))
  x, t, context, mask, pooled = inputs(cfg, batch=1)
  y = jitted(model)(x, t, context, mask, None, pooled)
  y_ref = jitted(ref)(x, t, context, mask, None, pooled)
  assert y.dtype == jnp.float32
  err = np.abs(np.asarray(y) - np.asarray(y_ref)).max() / np.abs(np.asarray(y_ref)).max()
  assert 0 < err < 0.1


def test_bad_inputs_raise_clear_errors():
  cfg = tiny_config()
  model = UNet(cfg, rngs=nnx.Rngs(0))
  x, t, context, mask, pooled = inputs(cfg)
  with pytest.raises(ValueError, match=r"x must have shape \[B, 8, 8, 3\]"):
    model(x[:, :4, :4], t, context, mask, pooled_text=pooled)
  with pytest.raises(ValueError, match=r"x must have shape"):
    model(np.concatenate([x, x], -1), t, context, mask, pooled_text=pooled)
  with pytest.raises(ValueError, match="context must have shape"):
    model(x, t, context[..., :8], mask, pooled_text=pooled)
  with pytest.raises(ValueError, match="pooled_text .* is required"):
    model(x, t, context, mask)


def test_config_errors_name_the_key():
  m = dict(model_section("toy.py"))
  m["unexpected"] = 1
  with pytest.raises(ValueError, match="unknown model config key: model.unexpected"):
    UNetConfig.from_config(m)
  m = dict(model_section("toy.py"))
  del m["norm_eps"]
  with pytest.raises(ValueError, match="missing model config key: model.norm_eps"):
    UNetConfig.from_config(m)
  with pytest.raises(ValueError, match="neighbor_attn_resolutions"):
    tiny_config(num_neighbors=2, neighbor_attn_resolutions=(5,))
  with pytest.raises(ValueError, match="down_block_types"):
    tiny_config(down_block_types=("DownBlock2D",) * 3)
  with pytest.raises(ValueError, match="model.resnet_time_scale_shift must be one of"):
    tiny_config(resnet_time_scale_shift="spatial")
