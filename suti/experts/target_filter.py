"""Filtering an expert's rendered targets: CLIP-I to the cluster, CLIP-T to the prompt, and two heuristics.

A candidate (an expert's image for one of the cluster's new prompts) is kept only when it passes, in order:
  blank       pixel std (over all pixels and channels, in [0, 255]) below blank_std_threshold: a failed render;
  near_copy   it reproduces one reference: CLIP-I to a single real image >= near_copy_clip_threshold, or mean
              absolute pixel difference to a real image (resized to the candidate's size) <= near_copy_pixel_threshold;
              an apprentice trained on such a target learns to copy its demos, not to recontextualise them;
  clip_i_low  mean CLIP-I to the cluster's real images below clip_i_threshold: the subject's identity is lost;
  clip_t_low  CLIP-T to the prompt (rare token removed: CLIP does not know it) below clip_t_threshold.
Thresholds belong to one CLIP model: `suti data calibrate-targets` prints the distributions to set them from.
"""
from __future__ import annotations

import collections
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from suti.embed import clip as clip_lib

REASONS = ("blank", "near_copy", "clip_i_low", "clip_t_low")


@dataclass(frozen=True)
class TargetFilterConfig:
  clip_i_threshold: float
  clip_t_threshold: float
  blank_std_threshold: float
  near_copy_clip_threshold: float
  near_copy_pixel_threshold: float

  @classmethod
  def from_config(cls, section: Any) -> "TargetFilterConfig":
    """From `config.targets.filter` (a ConfigDict or mapping holding exactly this class's fields)."""
    names = [f.name for f in dataclasses.fields(cls)]
    keys = set(section.keys())
    missing, unknown = sorted(set(names) - keys), sorted(keys - set(names))
    if missing or unknown:
      raise ValueError(f"targets.filter: missing keys {missing}, unknown keys {unknown}; expected exactly {names}")
    values = {}
    for name in names:
      try:
        values[name] = float(section[name])
      except (TypeError, ValueError):
        raise ValueError(f"targets.filter.{name} must be a number, got {section[name]!r}") from None
    return cls(**values)

  def to_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


def clip_prompt(prompt: str, token: str) -> str:
  """The prompt CLIP-T sees: the rare identifier removed as a whole word, whitespace normalised
  ("a sks ball on the beach", "sks" -> "a ball on the beach"; "asks" stays)."""
  if token.strip():
    prompt = re.sub(rf"(?<!\w){re.escape(token.strip())}(?!\w)", " ", prompt)
  return " ".join(prompt.split())


@dataclass
class CandidateScores:
  """What the filter knows of one candidate image."""
  clip_i: float  # mean CLIP image cosine to the cluster's real images
  clip_i_max: float  # the highest cosine to a single real image
  clip_t: float  # CLIP cosine to the (token-free) prompt
  pixel_std: float  # in [0, 255]
  min_pixel_distance: float  # smallest mean |difference| to a real image, in [0, 255]

  def to_dict(self) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, d: dict) -> "CandidateScores":
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in d]
    if missing:
      raise ValueError(f"candidate scores lack {missing}")
    return cls(**{n: float(d[n]) for n in names})


def _check_image(image: np.ndarray, what: str) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
    raise ValueError(f"{what} must be a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
  return image


def _resized(image: np.ndarray, height: int, width: int) -> np.ndarray:
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC), np.uint8)


def min_pixel_distance(image: np.ndarray, references: Sequence[np.ndarray]) -> float:
  """Smallest mean absolute pixel difference between `image` and a reference resized to its size."""
  h, w = image.shape[:2]
  x = image.astype(np.int16)
  return min(float(np.abs(x - _resized(r, h, w).astype(np.int16)).mean()) for r in references)


def score_candidates(clip_model, tokenizer: Callable, images: Sequence[np.ndarray], clip_prompts: Sequence[str],
                     references: Sequence[np.ndarray], batch_size: int = 256) -> list[CandidateScores]:
  """Scores of each candidate image (any sizes) against its prompt (already passed through clip_prompt)
  and the cluster's real images, whose embeddings are computed once."""
  images = [_check_image(img, f"candidate {i}") for i, img in enumerate(images)]
  references = [_check_image(img, f"reference {i}") for i, img in enumerate(references)]
  if len(images) != len(clip_prompts):
    raise ValueError(f"{len(images)} candidate images but {len(clip_prompts)} prompts")
  if not references:
    raise ValueError("scoring candidates needs at least one reference image")
  if not images:
    return []
  ref_emb = clip_lib.embed_images(clip_model, references, batch_size)
  img_emb = clip_lib.embed_images(clip_model, images, batch_size)
  txt_emb = clip_lib.encode_texts(clip_model, tokenizer, list(clip_prompts), batch_size)
  to_refs = img_emb @ ref_emb.T  # [N, R]; embeddings are L2-normalised
  clip_t = np.einsum("nd,nd->n", img_emb, txt_emb)
  return [CandidateScores(clip_i=float(to_refs[i].mean()), clip_i_max=float(to_refs[i].max()),
                          clip_t=float(clip_t[i]), pixel_std=float(img.std()),
                          min_pixel_distance=min_pixel_distance(img, references))
          for i, img in enumerate(images)]


def failing_reasons(scores: CandidateScores, cfg: TargetFilterConfig) -> list[str]:
  """Every test the candidate fails, in REASONS order."""
  failed = {
      "blank": scores.pixel_std < cfg.blank_std_threshold,
      "near_copy": (scores.clip_i_max >= cfg.near_copy_clip_threshold
                    or scores.min_pixel_distance <= cfg.near_copy_pixel_threshold),
      "clip_i_low": scores.clip_i < cfg.clip_i_threshold,
      "clip_t_low": scores.clip_t < cfg.clip_t_threshold,
  }
  return [reason for reason in REASONS if failed[reason]]


def decide(scores: CandidateScores, cfg: TargetFilterConfig) -> str | None:
  """The first failing reason (REASONS order), or None when the candidate is kept."""
  reasons = failing_reasons(scores, cfg)
  return reasons[0] if reasons else None


@dataclass
class FilterTally:
  """Decisions counted: kept, and dropped by reason; every decision lands in exactly one count."""
  kept: int = 0
  dropped: collections.Counter = field(default_factory=collections.Counter)

  def add(self, decision: str | None) -> None:
    if decision is None:
      self.kept += 1
    elif decision in REASONS:
      self.dropped[decision] += 1
    else:
      raise ValueError(f"unknown filter decision {decision!r}; expected None or one of {REASONS}")

  def update(self, other: "FilterTally") -> None:
    self.kept += other.kept
    self.dropped.update(other.dropped)

  @property
  def total(self) -> int:
    return self.kept + sum(self.dropped.values())

  @property
  def keep_rate(self) -> float:
    """Kept / decided (0.0 before any decision)."""
    return self.kept / self.total if self.total else 0.0
