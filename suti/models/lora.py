"""LoRA for the UNet: h = W0 x + (alpha / r) B A x on chosen layers, with a rank per UNet block.

Blocks follow the Stable Diffusion split that block-wise LoRA uses (arXiv 2403.07500): the down blocks
(`down_blocks.0` ...), the mid block, the up blocks. `LoRASpec.ranks` gives each block a rank; rank 0 leaves
the block untouched (its layers are not even wrapped, so it computes exactly what the base model computes).
Plain LoRA is the same spec with one rank for every block.

Inside a block the adapted layers are the attention projections (`to_q`, `to_k`, `to_v`, `to_out` of self and
text cross-attention) and, with `conv=True`, the convolutions of its ResNets and down/upsamplers. A wrapped layer
keeps its own `kernel` / `bias` under the same path and adds `lora_a` / `lora_b` (nnx.LoRAParam, a Param
subtype) beside them; B starts at zero, so a freshly wrapped model equals the base model.

An expert stores only its LoRA arrays (`lora_weights`, keyed by path) and sampling merges them into the base
kernels (`merge_lora`): W = W0 + (alpha / r) A B, exact for Linear and for Conv (A is a conv with the base
kernel's window, B a pointwise map, so their product is again a conv kernel of the base's shape).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from suti.models.layers import fan_in_normal, zeros_init

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out")
CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "conv")
LORA_KEYS = ("lora_a", "lora_b")


@dataclass(frozen=True)
class LoRASpec:
  """Which blocks get which rank. `ranks` maps block names ("down_blocks.0", "mid_block", "up_blocks.2") to r."""
  ranks: Mapping[str, int]
  alpha: float = 1.0  # the update is scaled by alpha / r (per layer), so alpha = r means no rescaling
  conv: bool = False  # also adapt ResNet and sampler convolutions

  def __post_init__(self):
    for block, rank in self.ranks.items():
      if int(rank) < 0:
        raise ValueError(f"LoRA rank of {block} must be >= 0, got {rank}")

  def rank_of(self, block: str) -> int:
    return int(self.ranks.get(block, 0))


def block_names(num_down: int, num_up: int) -> list[str]:
  return [f"down_blocks.{i}" for i in range(num_down)] + ["mid_block"] + [f"up_blocks.{i}" for i in range(num_up)]


def spec_from_config(lora_cfg, num_down: int, num_up: int, *, blockwise: bool) -> LoRASpec:
  """`lora.rank` for every block, or (blockwise) `lora.down_ranks` / `lora.mid_rank` / `lora.up_ranks`."""
  if not blockwise:
    rank = int(lora_cfg.rank)
    return LoRASpec({name: rank for name in block_names(num_down, num_up)}, float(lora_cfg.alpha),
                    bool(lora_cfg.conv))
  down, up = tuple(lora_cfg.down_ranks), tuple(lora_cfg.up_ranks)
  if len(down) != num_down or len(up) != num_up:
    raise ValueError(f"block-wise LoRA needs {num_down} down_ranks and {num_up} up_ranks for this UNet, "
                     f"got {len(down)} and {len(up)}")
  ranks = {f"down_blocks.{i}": int(r) for i, r in enumerate(down)}
  ranks["mid_block"] = int(lora_cfg.mid_rank)
  ranks.update({f"up_blocks.{i}": int(r) for i, r in enumerate(up)})
  return LoRASpec(ranks, float(lora_cfg.alpha), bool(lora_cfg.conv))


def _adopt(new: nnx.Module, base: nnx.Module) -> None:
  """Gives `new` every attribute of `base` (the same kernel / bias Variables, dtype, padding, ...)."""
  for name, value in vars(base).items():
    if not name.startswith("_"):
      setattr(new, name, value)


class LoRALinear(nnx.Linear):
  """An nnx.Linear (same kernel and bias paths) plus a rank-r update (alpha / r) * (x A) B."""

  def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):  # noqa: super() not called
    _adopt(self, base)
    self.lora_scale = float(alpha) / rank
    self.lora_a = nnx.LoRAParam(fan_in_normal(rngs.params(), (base.in_features, rank)))
    self.lora_b = nnx.LoRAParam(zeros_init(None, (rank, base.out_features)))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = super().__call__(x)
    dtype = y.dtype
    delta = (x.astype(dtype) @ self.lora_a.get_value().astype(dtype)) @ self.lora_b.get_value().astype(dtype)
    return y + jnp.asarray(self.lora_scale, dtype) * delta


def _pair(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


class LoRAConv(nnx.Conv):
  """An nnx.Conv plus a rank-r update: a conv to r channels with the base window, then a pointwise r -> out map."""

  def __init__(self, base: nnx.Conv, rank: int, alpha: float, *, rngs: nnx.Rngs):  # noqa: super() not called
    _adopt(self, base)
    if base.feature_group_count != 1:
      raise ValueError("LoRA on grouped convolutions is not supported")
    self.lora_scale = float(alpha) / rank
    window = tuple(base.kernel_size)
    self.lora_a = nnx.LoRAParam(fan_in_normal(rngs.params(), window + (base.in_features, rank)))
    self.lora_b = nnx.LoRAParam(zeros_init(None, (rank, base.out_features)))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = super().__call__(x)
    dtype = y.dtype
    low = jax.lax.conv_general_dilated(
        x.astype(dtype), self.lora_a.get_value().astype(dtype), window_strides=_pair(self.strides),
        padding=self.padding, rhs_dilation=_pair(self.kernel_dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + jnp.asarray(self.lora_scale, dtype) * (low @ self.lora_b.get_value().astype(dtype))


def _wrap_layers(module: nnx.Module, rank: int, alpha: float, conv: bool, rngs: nnx.Rngs) -> int:
  """Replaces the target layers under `module` (depth first, attribute order) by LoRA layers; returns how many."""
  count = 0
  for name, child in list(vars(module).items()):
    if name.startswith("_"):
      continue
    if isinstance(child, nnx.List):
      for item in child:
        if isinstance(item, nnx.Module):
          count += _wrap_layers(item, rank, alpha, conv, rngs)
    elif isinstance(child, (LoRALinear, LoRAConv)):
      raise ValueError("this model already has LoRA layers")
    elif isinstance(child, nnx.Linear) and name in ATTENTION_TARGETS:
      setattr(module, name, LoRALinear(child, rank, alpha, rngs=rngs))
      count += 1
    elif isinstance(child, nnx.Conv) and conv and name in CONV_TARGETS:
      setattr(module, name, LoRAConv(child, rank, alpha, rngs=rngs))
      count += 1
    elif isinstance(child, nnx.Module):
      count += _wrap_layers(child, rank, alpha, conv, rngs)
  return count


def _blocks(unet: nnx.Module) -> dict[str, nnx.Module]:
  blocks = {f"down_blocks.{i}": b for i, b in enumerate(unet.down_blocks)}
  blocks["mid_block"] = unet.mid_block
  blocks.update({f"up_blocks.{i}": b for i, b in enumerate(unet.up_blocks)})
  return blocks


def add_lora(unet: nnx.Module, spec: LoRASpec, *, rngs: nnx.Rngs) -> dict[str, int]:
  """Wraps the target layers of every block with a nonzero rank, in place; returns adapted layers per block.

  Raises ValueError for a block name the UNet lacks and when no layer at all would be adapted.
  """
  blocks = _blocks(unet)
  unknown = sorted(set(spec.ranks) - set(blocks))
  if unknown:
    raise ValueError(f"LoRA ranks name blocks this UNet lacks: {', '.join(unknown)} (it has {', '.join(blocks)})")
  counts = {}
  for name, block in blocks.items():
    rank = spec.rank_of(name)
    counts[name] = _wrap_layers(block, rank, spec.alpha, spec.conv, rngs) if rank > 0 else 0
  if not any(counts.values()):
    raise ValueError("this LoRA spec adapts no layer: every rank is 0, or the chosen blocks have no attention "
                     "(set lora.conv=True to adapt their convolutions)")
  return counts


def _path_name(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def lora_weights(model: nnx.Module) -> dict[str, np.ndarray]:
  """The LoRA arrays of a model as host numpy, keyed '<layer path>/lora_a' and '<layer path>/lora_b'."""
  return {_path_name(path): np.asarray(var.get_value())
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}


def lora_layers(lora: Mapping[str, np.ndarray]) -> list[str]:
  """Layer paths of a flat LoRA dict (each must have both lora_a and lora_b)."""
  layers = sorted({name.rsplit("/", 1)[0] for name in lora})
  for layer in layers:
    for key in LORA_KEYS:
      if f"{layer}/{key}" not in lora:
        raise ValueError(f"LoRA weights of {layer} lack {key}")
  return layers


def merge_lora(weights: Mapping[str, np.ndarray], lora: Mapping[str, np.ndarray], alpha: float) -> dict:
  """Flat base weights {'unet/.../to_q/kernel': W0} + flat LoRA arrays -> flat weights with W0 + (alpha/r) A B.

  Every LoRA layer must exist in `weights` with a kernel whose shape the product matches; the input is not
  modified. Layers without LoRA arrays are passed through as they are (the same array objects).
  """
  merged = dict(weights)
  for layer in lora_layers(lora):
    a, b = np.asarray(lora[f"{layer}/lora_a"], np.float32), np.asarray(lora[f"{layer}/lora_b"], np.float32)
    kernel_name = f"{layer}/kernel"
    if kernel_name not in weights:
      raise ValueError(f"LoRA layer {layer} has no kernel in the base weights")
    kernel = np.asarray(weights[kernel_name])
    rank = a.shape[-1]
    if b.shape[0] != rank or a.shape[:-1] != kernel.shape[:-1] or b.shape[1] != kernel.shape[-1]:
      raise ValueError(f"LoRA shapes {a.shape} x {b.shape} do not fit the kernel {kernel.shape} of {layer}")
    delta = (a.reshape(-1, rank) @ b).reshape(kernel.shape) * np.float32(alpha / rank)
    merged[kernel_name] = (kernel.astype(np.float32) + delta).astype(kernel.dtype)
  return merged
