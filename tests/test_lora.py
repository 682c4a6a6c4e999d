"""LoRA for the UNet (suti/models/lora.py): rank 0 is the base model, merging is exact, specs are checked."""
import jax
import ml_collections as mlc
import numpy as np
import pytest
from flax import nnx

from suti.models import lora as lora_lib
from suti.models.load_weights import load_weights
from suti.core.tree_paths import flatten_dict
from suti.models.lora import LoRAConv, LoRALinear, LoRASpec, add_lora, lora_weights, merge_lora, spec_from_config
from suti.models.unet import UNet
from shared_fixtures import tiny_unet_config

pytestmark = pytest.mark.costly(seconds=30)  # cold seconds (--durations): costly files start first

# The tiny UNet: down_blocks.0 (ResNet + strided downsampler, no attention), down_blocks.1 (attention),
# mid_block (attention), up_blocks.0 (attention + upsampler), up_blocks.1 (ResNets only).
BLOCKS = ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]


def make_unet() -> UNet:
  return UNet(tiny_unet_config(), rngs=nnx.Rngs(0))


def base_weights(unet: UNet) -> dict[str, np.ndarray]:
  """Flat kernels / biases / norms without LoRA arrays (LoRAParam is a Param subtype)."""
  state = nnx.state(unet, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  return {k: np.asarray(v) for k, v in flatten_dict(nnx.to_pure_dict(state)).items()}


def inputs(batch: int = 2):
  cfg = tiny_unet_config()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, cfg.image_size, cfg.image_size, cfg.in_channels)).astype(np.float32)
  t = np.array([10, 700][:batch], np.int32)
  context = rng.standard_normal((batch, 5, cfg.cross_attention_dim)).astype(np.float32)
  mask = np.ones((batch, 5), bool)
  mask[-1, 3:] = False
  pooled = rng.standard_normal((batch, cfg.cross_attention_dim)).astype(np.float32)
  return x, t, context, mask, None, pooled


def forward(unet: UNet) -> np.ndarray:
  """Op by op, not jitted: XLA compiles the base and the LoRA program into different fusions whose float sums
  may differ in the last bit (measured: 1.2e-6 for conv=True), while op by op an added B = 0 update is exact."""
  return np.asarray(unet(*inputs()))


def randomise_lora_b(model: nnx.Module, seed: int, scale: float = 0.3) -> None:
  """B = 0 makes the update vanish; random B makes every adapted layer differ from its base."""
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    if str(path[-1]) == "lora_b":
      var.set_value(jax.numpy.asarray(rng.standard_normal(var.shape).astype(np.float32) * scale))


def module_at(unet: UNet, dotted: str):
  node = unet
  for part in dotted.split("/"):
    node = node[int(part)] if part.isdigit() else getattr(node, part)
  return node


@pytest.fixture(scope="module")
def base_output():
  return forward(make_unet())


# --- rank 0 is the base model ------------------------------------------------------------------------------
def test_all_zero_spec_adapts_no_layer():
  with pytest.raises(ValueError, match="adapts no layer"):
    add_lora(make_unet(), LoRASpec({name: 0 for name in BLOCKS}), rngs=nnx.Rngs(1))
  # Ranks only on blocks without attention, convolutions off: still nothing to adapt.
  with pytest.raises(ValueError, match="adapts no layer"):
    add_lora(make_unet(), LoRASpec({"down_blocks.0": 4, "up_blocks.1": 4}, conv=False), rngs=nnx.Rngs(1))


def test_rank_zero_blocks_are_not_wrapped_and_output_is_bit_identical(base_output):
  unet = make_unet()
  counts = add_lora(unet, LoRASpec({"down_blocks.1": 2, "up_blocks.0": 3}, alpha=2.0), rngs=nnx.Rngs(1))
  assert counts == {"down_blocks.0": 0, "down_blocks.1": 8, "mid_block": 0, "up_blocks.0": 16, "up_blocks.1": 0}
  attn = "attentions/0/transformer_blocks/0/attn1"
  for name in ("to_q", "to_k", "to_v", "to_out"):
    assert type(module_at(unet, f"mid_block/{attn}/{name}")) is nnx.Linear
    assert type(module_at(unet, f"down_blocks/1/{attn}/{name}")) is LoRALinear
    assert type(module_at(unet, f"up_blocks/0/{attn}/{name}")) is LoRALinear
  # conv=False: no convolution is wrapped anywhere, not even in the adapted blocks.
  assert type(module_at(unet, "down_blocks/0/downsamplers/0/conv")) is nnx.Conv
  assert type(module_at(unet, "up_blocks/0/resnets/0/conv1")) is nnx.Conv
  # The base kernels stay where they were, so a checkpoint of the base still loads by path.
  assert set(base_weights(unet)) == set(base_weights(make_unet()))
  np.testing.assert_array_equal(forward(unet), base_output)


def test_fresh_lora_with_conv_is_bit_identical(base_output):
  unet = make_unet()
  counts = add_lora(unet, LoRASpec({name: 2 for name in BLOCKS}, alpha=2.0, conv=True), rngs=nnx.Rngs(1))
  assert all(c > 0 for c in counts.values())
  assert type(module_at(unet, "down_blocks/0/downsamplers/0/conv")) is LoRAConv
  bs = [v for p, v in nnx.to_flat_state(nnx.state(unet, nnx.LoRAParam)) if str(p[-1]) == "lora_b"]
  assert bs and all(not np.any(np.asarray(v.get_value())) for v in bs)
  assert np.array_equal(forward(unet), base_output)


# --- merging is exact --------------------------------------------------------------------------------------
@pytest.mark.parametrize("conv", [False, True])
def test_merged_base_model_equals_lora_model(conv, base_output):
  unet = make_unet()
  base = base_weights(unet)
  spec = LoRASpec({name: 3 for name in BLOCKS}, alpha=1.5, conv=conv)
  add_lora(unet, spec, rngs=nnx.Rngs(1))
  if conv:  # the strided downsampler and the upsampler's conv are adapted too
    assert type(module_at(unet, "down_blocks/0/downsamplers/0/conv")) is LoRAConv
    assert type(module_at(unet, "up_blocks/0/upsamplers/0/conv")) is LoRAConv
  randomise_lora_b(unet, 7)
  lora_out = forward(unet)
  assert not np.allclose(lora_out, base_output, atol=1e-3)  # the update really changes the model

  merged = merge_lora(base, lora_weights(unet), spec.alpha)
  changed = [k for k in base if merged[k] is not base[k]]
  assert len(changed) == len(lora_lib.lora_layers(lora_weights(unet)))
  plain = make_unet()
  load_weights(plain, merged)
  np.testing.assert_allclose(forward(plain), lora_out, atol=1e-5, rtol=1e-5)


class _Holder(nnx.Module):
  def __init__(self, layer):
    self.to_q = layer


def test_merge_closed_form_on_one_linear():
  base = nnx.Linear(5, 4, rngs=nnx.Rngs(0))
  w0, bias = np.asarray(base.kernel.get_value()), np.asarray(base.bias.get_value())
  alpha, rank = 3.0, 2
  holder = _Holder(LoRALinear(base, rank, alpha, rngs=nnx.Rngs(1)))
  b = np.random.default_rng(0).standard_normal((rank, 4)).astype(np.float32)
  holder.to_q.lora_b.set_value(jax.numpy.asarray(b))
  lora = lora_weights(holder)
  assert sorted(lora) == ["to_q/lora_a", "to_q/lora_b"]
  a = lora["to_q/lora_a"]
  assert a.shape == (5, rank)
  merged = merge_lora({"to_q/kernel": w0, "to_q/bias": bias}, lora, alpha)
  np.testing.assert_array_equal(merged["to_q/kernel"], w0 + np.float32(alpha / rank) * (a @ b))
  assert merged["to_q/bias"] is bias
  x = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(holder.to_q(x)), x @ merged["to_q/kernel"] + bias, atol=1e-5)


@pytest.mark.parametrize("strides,padding,dilation", [
    (1, "SAME", 1), (2, ((1, 1), (1, 1)), 1), (2, "VALID", 1), (2, "SAME", 1), (1, "SAME", 2)])
def test_merge_is_exact_for_one_conv(strides, padding, dilation):
  kw = dict(kernel_size=(3, 3), strides=strides, padding=padding, kernel_dilation=dilation)
  base = nnx.Conv(3, 6, **kw, rngs=nnx.Rngs(0))
  plain = nnx.Conv(3, 6, **kw, rngs=nnx.Rngs(5))
  w0, bias = np.asarray(base.kernel.get_value()), np.asarray(base.bias.get_value())
  holder = _Holder(LoRAConv(base, 2, 4.0, rngs=nnx.Rngs(1)))
  holder.to_q.lora_b.set_value(jax.numpy.asarray(np.random.default_rng(0).standard_normal((2, 6)), np.float32))
  merged = merge_lora({"to_q/kernel": w0, "to_q/bias": bias}, lora_weights(holder), 4.0)
  plain.kernel.set_value(jax.numpy.asarray(merged["to_q/kernel"]))
  plain.bias.set_value(jax.numpy.asarray(bias))
  x = np.random.default_rng(2).standard_normal((2, 8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(holder.to_q(x)), np.asarray(plain(x)), atol=1e-5, rtol=1e-5)
  assert not np.allclose(np.asarray(holder.to_q(x)), np.asarray(base(x)), atol=1e-3)


def test_merge_rejects_bad_lora():
  w = {"to_q/kernel": np.zeros((5, 4), np.float32)}
  with pytest.raises(ValueError, match="lack"):
    merge_lora(w, {"to_q/lora_a": np.zeros((5, 2), np.float32)}, 1.0)
  with pytest.raises(ValueError, match="no kernel"):
    merge_lora(w, {"to_k/lora_a": np.zeros((5, 2)), "to_k/lora_b": np.zeros((2, 4))}, 1.0)
  with pytest.raises(ValueError, match="do not fit"):
    merge_lora(w, {"to_q/lora_a": np.zeros((4, 2)), "to_q/lora_b": np.zeros((2, 4))}, 1.0)


# --- specs ------------------------------------------------------------------------------------------------
def lora_cfg(**changes) -> mlc.ConfigDict:
  c = mlc.ConfigDict(dict(rank=4, alpha=2.0, conv=True, down_ranks=(1, 0), mid_rank=2, up_ranks=(0, 3)))
  c.update(changes)
  return c


def test_spec_from_config_plain_rank_covers_every_block():
  spec = spec_from_config(lora_cfg(), 2, 2, blockwise=False)
  assert dict(spec.ranks) == {name: 4 for name in BLOCKS}
  assert (spec.alpha, spec.conv) == (2.0, True)


def test_spec_from_config_blockwise():
  spec = spec_from_config(lora_cfg(), 2, 2, blockwise=True)
  assert dict(spec.ranks) == {"down_blocks.0": 1, "down_blocks.1": 0, "mid_block": 2, "up_blocks.0": 0,
                              "up_blocks.1": 3}
  with pytest.raises(ValueError, match=r"2 down_ranks and 2 up_ranks.*got 3 and 2"):
    spec_from_config(lora_cfg(down_ranks=(1, 0, 0)), 2, 2, blockwise=True)
  with pytest.raises(ValueError, match=r"got 2 and 1"):
    spec_from_config(lora_cfg(up_ranks=(1,)), 2, 2, blockwise=True)


def test_negative_rank_is_an_error():
  with pytest.raises(ValueError, match=">= 0"):
    spec_from_config(lora_cfg(rank=-1), 2, 2, blockwise=False)
  with pytest.raises(ValueError, match="mid_block"):
    spec_from_config(lora_cfg(mid_rank=-2), 2, 2, blockwise=True)


def test_unknown_block_is_an_error():
  with pytest.raises(ValueError, match="up_blocks.7"):
    add_lora(make_unet(), LoRASpec({"up_blocks.7": 2, "mid_block": 2}), rngs=nnx.Rngs(1))


def test_wrapping_twice_is_an_error():
  unet = make_unet()
  add_lora(unet, LoRASpec({"mid_block": 2}), rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="already has LoRA"):
    add_lora(unet, LoRASpec({"mid_block": 2}), rngs=nnx.Rngs(1))


# --- what an expert stores --------------------------------------------------------------------------------
def test_lora_weights_hold_only_lora_arrays():
  unet = make_unet()
  counts = add_lora(unet, LoRASpec({"down_blocks.0": 2, "mid_block": 3}, alpha=1.0, conv=True), rngs=nnx.Rngs(1))
  stored = lora_weights(unet)
  assert len(stored) == 2 * sum(counts.values())
  assert all(k.rsplit("/", 1)[1] in ("lora_a", "lora_b") for k in stored)
  assert all(k.startswith(("down_blocks/0/", "mid_block/")) for k in stored)
  assert all(isinstance(v, np.ndarray) for v in stored.values())
  layers = lora_lib.lora_layers(stored)
  assert len(layers) == sum(counts.values())
  ranks = {k: v.shape[-1] for k, v in stored.items() if k.endswith("lora_a")}
  assert {r for k, r in ranks.items() if k.startswith("mid_block/")} == {3}
  assert {r for k, r in ranks.items() if k.startswith("down_blocks/0/")} == {2}
