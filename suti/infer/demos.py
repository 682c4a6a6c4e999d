"""Demonstration images for few-shot generation: read from files, brought to the model, padded to K_max.

Demos may be of any size and format: each is decoded like a web image (EXIF rotation, alpha on white, CMYK and
16-bit converted), resized on its shorter side and center-cropped to the model's resolution, exactly as the
trainer's loader treats neighbors. Fewer demos than the model's K_max are padded with zero images, masked out.
Each demo goes in with a caption, as in training, where neighbors carry the pipeline's captions; without one the
pipeline's own caption for an image with useless alt text is used: "a photo of a <class noun>".
"""
from __future__ import annotations

import os
import re
from typing import Callable, Sequence

import numpy as np

from suti.core.image_ops import resize_and_crop, to_model_range
from suti.core.safe_image import ImageRejected, decode_image
from suti.models.neighbors import pad_neighbors

MAX_DEMOS = 5  # the CLI's limit; a model takes at most its own model.num_neighbors


def read_image(path: str, what: str = "demo") -> np.ndarray:
  """uint8 [H, W, 3] RGB of an image file; FileNotFoundError / ValueError in one line otherwise."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} image {path} does not exist" if not os.path.isdir(path)
                            else f"{what} image {path} is a folder, not an image file")
  with open(path, "rb") as f:
    data = f.read()
  try:
    return decode_image(data)
  except ImageRejected as err:
    raise ValueError(f"{what} image {path} is not a readable image ({err.reason})") from None


def default_caption(prompt: str, token: str = "sks") -> str:
  """The caption a demo gets when none is given: "a photo of a <noun>", the noun being the word after the
  identifier token in the prompt ("a sks ball on the beach" -> "a photo of a ball"), else the empty caption."""
  match = re.search(rf"(?<!\w){re.escape(token)}\s+(\w+)", prompt) if token else None
  return f"a photo of a {match.group(1)}" if match else ""


def check_demo_count(count: int, max_neighbors: int) -> None:
  if count < 1:
    raise ValueError("few-shot generation needs at least one demo image (--demo FILE, 3 is standard)")
  limit = min(MAX_DEMOS, max_neighbors)
  if count > limit:
    raise ValueError(f"got {count} demo images; this model takes at most {limit} (model.num_neighbors = "
                     f"{max_neighbors})")


def demo_batch(rows: Sequence[Sequence[np.ndarray]], captions: Sequence[Sequence[str]], *, image_size: int,
               max_neighbors: int, tokenize: Callable) -> dict[str, np.ndarray]:
  """Per row (one generated image) its demos (uint8 images of any size) and their captions -> the `demos` dict
  of suti.infer.sampling: images float32 [B,K,S,S,3] in [-1,1], ids / text_mask [B,K,L], neighbor_mask [B,K]."""
  for demos in rows:
    check_demo_count(len(demos), int(max_neighbors))
  images = [[to_model_range(resize_and_crop(np.asarray(image), int(image_size))) for image in demos] for demos in rows]
  return pad_neighbors(images, captions, num_neighbors=max_neighbors, image_size=image_size, tokenize=tokenize)
