"""open_clip models by name and local weights file, and their L2-normalised image and text embeddings.

Every CLIP in the project loads here: the CLIP filter, the experts' target filter and the metrics, at toy scale
(the shipped toy CLIP) and at full scale (ViT-L/14 from a local file) through the same
`open_clip.create_model_and_transforms(name, pretrained=<local file>)` call, so nothing is downloaded. The toy
architecture ("toy-ViT-32": a ViT on 32x32 images with 8x8 patches and a small text transformer over open_clip's
own BPE vocabulary) is an open_clip model config in `toy_clip_configs/`, registered with
`open_clip.add_model_config`.
"""
from __future__ import annotations

import collections
import os
from typing import Any, Callable, Sequence

import numpy as np

# open_clip imports torchvision: importing any suti module has put the shim in place (suti/__init__.py).
from suti.core.paths import resolve_path

TOY_MODEL_NAME = "toy-ViT-32"
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_clip_configs")
CHECKPOINT_FILE = "open_clip_model.safetensors"


def register_toy_configs() -> None:
  """Make the toy model names known to open_clip (idempotent)."""
  import open_clip  # lazy: torch / open_clip load only when a CLIP is used
  if TOY_MODEL_NAME not in open_clip.list_models():
    open_clip.add_model_config(CONFIG_DIR)


def _resolve_checkpoint(checkpoint_path: str) -> str:
  path = checkpoint_path
  if os.path.isdir(path):
    path = os.path.join(path, CHECKPOINT_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"CLIP checkpoint not found: {checkpoint_path!r} (expected a file, or a folder "
                     f"holding {CHECKPOINT_FILE})")
  return path


def load_clip(model_name: str, checkpoint_path: str | None) -> tuple[Any, Callable, Callable]:
  """(model in eval mode, inference preprocess, tokenizer) through open_clip's own loader.

  `checkpoint_path` is a local weights file (or a folder holding open_clip_model.safetensors);
  None gives random weights (tests only). Nothing is downloaded.
  """
  import open_clip  # lazy: torch / open_clip load only when a CLIP is used
  register_toy_configs()
  if model_name.replace("/", "-") not in open_clip.list_models():
    raise ValueError(f"unknown open_clip model {model_name!r}")
  pretrained = _resolve_checkpoint(checkpoint_path) if checkpoint_path else None
  model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
  model.eval()
  return model, preprocess, open_clip.get_tokenizer(model_name)


def _preprocess_cfg(model) -> dict:
  cfg = getattr(model.visual, "preprocess_cfg", None) or {}
  size = cfg.get("size", model.visual.image_size)
  size = size if isinstance(size, int) else int(size[0])
  return {"size": size, "mean": cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)),
          "std": cfg.get("std", (0.26862954, 0.26130258, 0.27577711))}


def images_to_tensor(model, images: np.ndarray):
  """uint8 [N, H, W, 3] -> the normalised float tensor the model expects, done in torch on the
  batch: resize the shortest side (bicubic, antialiased) and centre-crop, as open_clip's
  inference transform does, without a PIL round trip per image."""
  import torch  # lazy: torch / open_clip load only when a CLIP is used
  import torch.nn.functional as F  # lazy: torch / open_clip load only when a CLIP is used
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
  cfg = _preprocess_cfg(model)
  x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
  size, (h, w) = cfg["size"], images.shape[1:3]
  if (h, w) != (size, size):
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, :, top:top + size, left:left + size].clamp(0, 1)
  mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
  std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
  return (x - mean) / std


def encode_images(model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """L2-normalised image embeddings [N, D] (float32) of uint8 [N, H, W, 3] images."""
  import torch  # lazy: torch / open_clip load only when a CLIP is used
  images = np.asarray(images)
  if len(images) == 0:
    return np.zeros((0, model.visual.output_dim), np.float32)
  out = []
  with torch.inference_mode():
    for start in range(0, len(images), batch_size):
      x = images_to_tensor(model, images[start:start + batch_size])
      out.append(model.encode_image(x, normalize=True).float().numpy())
  return np.concatenate(out, 0)


def encode_texts(model, tokenizer: Callable, texts: Sequence[str],
                 batch_size: int = 256) -> np.ndarray:
  """L2-normalised text embeddings [N, D] (float32)."""
  import torch  # lazy: torch / open_clip load only when a CLIP is used
  texts = list(texts)
  if not texts:
    return np.zeros((0, model.text_projection.shape[1] if hasattr(model, "text_projection")
                     else model.visual.output_dim), np.float32)
  out = []
  with torch.inference_mode():
    for start in range(0, len(texts), batch_size):
      tokens = tokenizer(texts[start:start + batch_size])
      out.append(model.encode_text(tokens, normalize=True).float().numpy())
  return np.concatenate(out, 0)


def load_clip_from_config(config) -> tuple[Any, Callable, Callable]:
  """(model, preprocess, tokenizer) of a config's `clip.model_name` and `clip.checkpoint` (relative paths
  resolve like every user path: working folder, then the shipped files)."""
  return load_clip(config.clip.model_name, resolve_path(config.clip.checkpoint))


def embed_images(model, images: list[np.ndarray], batch_size: int) -> np.ndarray:
  """L2-normalised embeddings of images of any sizes (same-size images are encoded together)."""
  by_shape: dict[tuple, list[int]] = collections.defaultdict(list)
  for i, img in enumerate(images):
    by_shape[img.shape].append(i)
  out = None
  for indices in by_shape.values():
    emb = encode_images(model, np.stack([images[i] for i in indices]), batch_size)
    if out is None:
      out = np.zeros((len(images), emb.shape[1]), np.float32)
    out[indices] = emb
  return out if out is not None else np.zeros((0, 0), np.float32)


class ClipEmbedder:
  """L2-normalised open_clip image and text embeddings."""

  def __init__(self, model_name: str, checkpoint: str, batch_size: int = 256):
    if not checkpoint:
      raise ValueError("the CLIP metrics need a local checkpoint (eval.clip.checkpoint)")
    self.model, _, self.tokenizer = load_clip(model_name, checkpoint)
    self.name = model_name
    self.batch_size = int(batch_size)

  def images(self, images: Sequence[np.ndarray]) -> np.ndarray:
    return embed_images(self.model, list(images), self.batch_size)

  def texts(self, texts: Sequence[str]) -> np.ndarray:
    return encode_texts(self.model, self.tokenizer, list(texts), self.batch_size)
