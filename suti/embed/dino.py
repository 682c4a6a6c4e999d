"""The DINO embedder of the metrics (the DINO score), from a local checkpoint file (nothing is downloaded).

A timm ViT (DreamBench uses ViT-S/16 DINO, `vit_small_patch16_224.dino`) with the
weights from a local safetensors file or a PyTorch file read with weights_only=True (the original
dino_deitsmall16_pretrain.pth has timm's parameter names). The embedding is the final CLS token, L2-normalised.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

# timm imports torchvision: importing any suti module has put the shim in place (suti/__init__.py).
from suti.core.image_ops import resize_and_crop


def load_timm_vit(model_name: str, checkpoint: str):
  """A timm model without its classifier head, weights from a local file; ValueError when they do not fit."""
  import timm  # lazy: torch / timm load only when DINO is scored
  import torch  # lazy: torch / timm load only when DINO is scored
  if not os.path.isfile(checkpoint):
    raise FileNotFoundError(f"DINO checkpoint {checkpoint} does not exist (eval.dino.checkpoint)")
  try:
    model = timm.create_model(model_name, pretrained=False, num_classes=0)
  except RuntimeError as err:
    raise ValueError(f"unknown timm model {model_name!r} (eval.dino.model_name): {err}") from None
  if checkpoint.endswith(".safetensors"):
    from safetensors.torch import load_file  # lazy: torch / timm load only when DINO is scored
    state = load_file(checkpoint)
  else:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher"):  # training checkpoints nest the weights
      if isinstance(state, dict) and isinstance(state.get(key), dict):
        state = state[key]
  state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()
           if not k.startswith("head.")}
  try:
    missing, unexpected = model.load_state_dict(state, strict=False)
  except RuntimeError as err:  # shapes that differ
    raise ValueError(f"DINO checkpoint {checkpoint} does not fit {model_name}: "
                     f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}") from None
  if missing or unexpected:
    raise ValueError(f"DINO checkpoint {checkpoint} does not fit {model_name}: {len(missing)} missing "
                     f"(e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})")
  return model.eval()


class DinoEmbedder:
  """L2-normalised CLS embeddings of a timm ViT, images resized (bicubic) and center-cropped to its input size."""

  def __init__(self, model_name: str, checkpoint: str, batch_size: int = 64):
    self.model = load_timm_vit(model_name, checkpoint)
    cfg = self.model.pretrained_cfg
    self.size = int(cfg.get("input_size", (3, 224, 224))[-1])
    self.mean = np.asarray(cfg.get("mean", (0.485, 0.456, 0.406)), np.float32)
    self.std = np.asarray(cfg.get("std", (0.229, 0.224, 0.225)), np.float32)
    self.batch_size = int(batch_size)
    self.name = model_name

  def _tensor(self, images: Sequence[np.ndarray]):
    import torch  # lazy: torch / timm load only when DINO is scored
    batch = np.stack([resize_and_crop(np.asarray(i, np.uint8), self.size) for i in images]).astype(np.float32)
    batch = (batch / 255.0 - self.mean) / self.std
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))

  def images(self, images: Sequence[np.ndarray]) -> np.ndarray:
    import torch  # lazy: torch / timm load only when DINO is scored
    images = list(images)
    if not images:
      return np.zeros((0, self.model.num_features), np.float32)
    out = []
    with torch.inference_mode():
      for start in range(0, len(images), self.batch_size):
        features = self.model(self._tensor(images[start:start + self.batch_size])).float().numpy()
        out.append(features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12))
    return np.concatenate(out)
