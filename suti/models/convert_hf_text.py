"""Hugging Face PyTorch text encoders (a local folder) -> our NNX T5Encoder / CLIPTextTransformer.

Reads `config.json` and the weights: `model.safetensors` (or a sharded `model.safetensors.index.json`),
else `pytorch_model.bin` (or its index) through `torch.load(weights_only=True)`: nothing is unpickled.
Works for encoder-only and full checkpoints (T5ForConditionalGeneration, CLIPModel): other weights are
ignored. The module is built abstractly (`nnx.eval_shape`) and filled, so no random weights are made.
Missing weights or shape mismatches raise one-line ValueErrors naming the weight.
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file

from suti.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from suti.models.t5 import T5Encoder, T5EncoderConfig

Weights = Mapping[str, np.ndarray]
Path = tuple  # a path in our module's flat state, e.g. ("layers", 0, "q", "kernel")


def read_hf_config(folder: str) -> dict:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"no config.json in {folder}")
  with open(path) as f:
    return json.load(f)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:

  try:
    return load_file(path)
  except TypeError:  # bfloat16 has no numpy dtype: read through jax instead
    with safe_open(path, framework="flax") as f:
      return {key: np.asarray(f.get_tensor(key).astype(jnp.float32)) for key in f.keys()}


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
  import torch  # lazy: torch only to read PyTorch checkpoints

  state = torch.load(path, map_location="cpu", weights_only=True)
  return {key: (value.float() if value.dtype == torch.bfloat16 else value).numpy() for key, value in state.items()}


def load_hf_weights(folder: str) -> dict[str, np.ndarray]:
  """All tensors of a local Hugging Face checkpoint folder, by their PyTorch names."""
  for filename, reader in (("model.safetensors", _read_safetensors), ("pytorch_model.bin", _read_torch_bin)):
    single, index = os.path.join(folder, filename), os.path.join(folder, filename + ".index.json")
    if os.path.isfile(single):
      return reader(single)
    if os.path.isfile(index):
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      weights: dict[str, np.ndarray] = {}
      for shard in shards:
        weights.update(reader(os.path.join(folder, shard)))
      return weights
  raise ValueError(f"no model.safetensors or pytorch_model.bin (or their .index.json) in {folder}")


def _prefix_of(weights: Weights, suffix: str, what: str) -> str:
  """The name prefix before `suffix` (checkpoints differ: "", "encoder.", "text_model.", ...)."""
  for key in weights:
    if key.endswith(suffix):
      return key[: -len(suffix)]
  raise ValueError(f"no weight named like '*{suffix}': not a {what} checkpoint")


def _take(weights: Weights, name: str) -> np.ndarray:
  if name not in weights:
    raise ValueError(f"checkpoint is missing the weight {name!r}")
  return np.asarray(weights[name])


def t5_param_map(weights: Weights, config: T5EncoderConfig) -> dict[Path, np.ndarray]:
  """Our T5Encoder parameter paths -> arrays (Linear kernels transposed to [in, out])."""
  prefix = _prefix_of(weights, "block.0.layer.0.SelfAttention.q.weight", "T5 encoder")
  embed_names = [n for n in ("shared.weight", prefix + "embed_tokens.weight") if n in weights]
  params = {
      ("embed", "embedding"): _take(weights, embed_names[0] if embed_names else "shared.weight"),
      ("relative_attention_bias",): _take(weights, prefix + "block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
      ("final_norm", "weight"): _take(weights, prefix + "final_layer_norm.weight"),
  }
  for i in range(config.num_layers):
    block = f"{prefix}block.{i}.layer."
    params[("layers", i, "attention_norm", "weight")] = _take(weights, block + "0.layer_norm.weight")
    for name in ("q", "k", "v", "o"):
      params[("layers", i, name, "kernel")] = _take(weights, f"{block}0.SelfAttention.{name}.weight").T
    params[("layers", i, "ffn_norm", "weight")] = _take(weights, block + "1.layer_norm.weight")
    ffn = block + "1.DenseReluDense."
    if config.gated:
      params[("layers", i, "wi_0", "kernel")] = _take(weights, ffn + "wi_0.weight").T
      params[("layers", i, "wi_1", "kernel")] = _take(weights, ffn + "wi_1.weight").T
    else:
      params[("layers", i, "wi_0", "kernel")] = _take(weights, ffn + "wi.weight").T
    params[("layers", i, "wo", "kernel")] = _take(weights, ffn + "wo.weight").T
  return params


def clip_text_names(config: CLIPTextConfig, prefix: str = "text_model.") -> dict[Path, tuple[str, bool]]:
  """Our CLIPTextTransformer parameter paths -> (Hugging Face weight name, whether the array is transposed: the
  Linear kernels, [in, out] here and [out, in] there)."""
  names = {
      ("token_embedding", "embedding"): (prefix + "embeddings.token_embedding.weight", False),
      ("position_embedding",): (prefix + "embeddings.position_embedding.weight", False),
      ("final_layer_norm", "scale"): (prefix + "final_layer_norm.weight", False),
      ("final_layer_norm", "bias"): (prefix + "final_layer_norm.bias", False),
  }
  for i in range(config.num_hidden_layers):
    layer = f"{prefix}encoder.layers.{i}."
    for ours, theirs in (("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"), ("v_proj", "self_attn.v_proj"),
                         ("out_proj", "self_attn.out_proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
      names[("layers", i, ours, "kernel")] = (f"{layer}{theirs}.weight", True)
      names[("layers", i, ours, "bias")] = (f"{layer}{theirs}.bias", False)
    for norm in ("layer_norm1", "layer_norm2"):
      names[("layers", i, norm, "scale")] = (f"{layer}{norm}.weight", False)
      names[("layers", i, norm, "bias")] = (f"{layer}{norm}.bias", False)
  return names


def clip_text_param_map(weights: Weights, config: CLIPTextConfig) -> dict[Path, np.ndarray]:
  """Our CLIPTextTransformer parameter paths -> arrays (Linear kernels transposed to [in, out])."""
  prefix = _prefix_of(weights, "embeddings.token_embedding.weight", "CLIP text")
  return {path: _take(weights, name).T if transposed else _take(weights, name)
          for path, (name, transposed) in clip_text_names(config, prefix).items()}


def clip_text_state_dict(model: CLIPTextTransformer) -> dict[str, np.ndarray]:
  """Our CLIP text weights under Hugging Face CLIPTextModel's names and layouts (float32)."""
  names = clip_text_names(model.config)
  out = {}
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name, transposed = names[tuple(path)]
    value = np.asarray(variable.get_value(), np.float32)
    out[name] = np.ascontiguousarray(value.T if transposed else value)
  return out


def hf_clip_text_config(config: CLIPTextConfig) -> dict:
  """A CLIPTextModel config.json for `config` (what transformers' from_pretrained reads)."""
  return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": config.vocab_size,
          "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
          "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
          "max_position_embeddings": config.max_position_embeddings, "hidden_act": config.hidden_act,
          "layer_norm_eps": config.layer_norm_eps, "eos_token_id": config.eos_token_id, "torch_dtype": "float32"}


def _fill(build: Callable[[], nnx.Module], params: dict[Path, np.ndarray]) -> nnx.Module:
  """Builds the module abstractly and sets every parameter from `params` (float32), checking shapes."""
  graphdef, state = nnx.split(nnx.eval_shape(build))
  flat = nnx.to_flat_state(state)
  expected = {path for path, _ in flat}
  if expected != set(params):
    missing, extra = sorted(map(str, expected - set(params))), sorted(map(str, set(params) - expected))
    raise ValueError(f"converter and model disagree: unset {missing[:3]}, unknown {extra[:3]}")
  for path, variable in flat:
    value = params[path]
    if tuple(value.shape) != tuple(variable.shape):
      raise ValueError(f"shape mismatch for {'.'.join(map(str, path))}: checkpoint {tuple(value.shape)}, "
                       f"model {tuple(variable.shape)} (config.json and weights disagree)")
    variable.set_value(jnp.asarray(value, jnp.float32))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_t5_encoder(folder: str, dtype: str = "float32") -> T5Encoder:
  """A T5 (v1.1) encoder from a local Hugging Face folder (T5EncoderModel or T5ForConditionalGeneration)."""
  hf = read_hf_config(folder)
  if hf.get("model_type", "t5") not in ("t5", "mt5"):
    raise ValueError(f"{folder} holds a {hf.get('model_type')!r} model, not T5")
  config = T5EncoderConfig.from_hf(hf, dtype=dtype)
  params = t5_param_map(load_hf_weights(folder), config)
  return _fill(lambda: T5Encoder(config, rngs=nnx.Rngs(0)), params)


def load_clip_text(folder: str, dtype: str = "float32") -> CLIPTextTransformer:
  """A CLIP text transformer from a local Hugging Face folder (CLIPTextModel[WithProjection] or CLIPModel)."""
  hf = read_hf_config(folder)
  if not re.fullmatch(r"clip(_text_model)?", hf.get("model_type", "clip_text_model")):
    raise ValueError(f"{folder} holds a {hf.get('model_type')!r} model, not CLIP")
  config = CLIPTextConfig.from_hf(hf, dtype=dtype)
  params = clip_text_param_map(load_hf_weights(folder), config)
  return _fill(lambda: CLIPTextTransformer(config, rngs=nnx.Rngs(0)), params)
