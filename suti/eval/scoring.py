"""Scores of generated images against one benchmark subject, per image, for every metric that applies.

Per image: CLIP-I (mean cosine to the subject's real images), CLIP-T (to the prompt without the identifier
token), DINO (when a DINO checkpoint is given), near_copy (a demo reproduced: mean pixel difference to a demo below
eval.near_copy_pixel_threshold, or CLIP cosine to a demo at or above eval.near_copy_clip_threshold), and on toy
benchmarks identity_rank (0 = the true subject ranks first among toy.identity_candidates subjects of its class, each
represented by toy.distractor_references renders in random contexts)
and context_ok (zero-shot CLIP picks the prompt's background). Means over all images are the reported figures.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from suti.core.image_ops import resize_and_crop
from suti.eval import metrics
from suti.eval.benchmark import BenchmarkSubject
from suti.experts.target_filter import clip_prompt, min_pixel_distance
from suti.toy import truth as toy_truth

PER_IMAGE = ("clip_i", "clip_t", "dino", "near_copy", "identity_rank", "context_ok")


@dataclass
class SubjectReference:
  """What every method's images of one subject are compared with, computed once per subject."""
  subject: BenchmarkSubject
  clip_real: np.ndarray  # [R, D]
  dino_real: np.ndarray | None
  demo_pixels: list[np.ndarray]  # the demos at the model's resolution
  demo_clip: np.ndarray
  toy: object | None = None  # the toy subject when the benchmark is a toy one
  candidates: list[np.ndarray] = field(default_factory=list)  # CLIP embeddings of renders of each candidate, true first


class Scorer:
  def __init__(self, clip, dino, eval_cfg, toy_cfg, image_size: int):
    self.clip, self.dino = clip, dino
    self.cfg, self.toy_cfg = eval_cfg, toy_cfg
    self.size = int(image_size)
    self._text_cache: dict[str, np.ndarray] = {}

  def _texts(self, texts: list[str]) -> np.ndarray:
    missing = sorted({t for t in texts if t not in self._text_cache})
    if missing:
      for text, emb in zip(missing, self.clip.texts(missing)):
        self._text_cache[text] = emb
    return np.stack([self._text_cache[t] for t in texts])

  def reference(self, subject: BenchmarkSubject, demos: list[np.ndarray]) -> SubjectReference:
    demo_pixels = [resize_and_crop(d, self.size) for d in demos]
    ref = SubjectReference(subject, self.clip.images(subject.images),
                           self.dino.images(subject.images) if self.dino else None,
                           demo_pixels, self.clip.images(demos))
    m = int(self.toy_cfg.identity_candidates)
    ref.toy = toy_truth.toy_subject(subject.name, subject.cls)
    if ref.toy is not None and m > 1:
      # Every candidate, the true subject included, is represented alike: fresh renders in random contexts (not
      # the demos, which a copy would match by construction).
      n, size = int(self.toy_cfg.distractor_references), subject.images[0].shape[0]
      ref.candidates = [self.clip.images(toy_truth.reference_renders(s, n, size))
                        for s in [ref.toy] + toy_truth.distractors(ref.toy, m - 1)]
    return ref

  def score(self, ref: SubjectReference, images: np.ndarray, prompts: list[str]) -> dict[str, np.ndarray]:
    """Per-image scores (arrays of len(images)); metrics that do not apply are absent."""
    images = np.asarray(images, np.uint8)
    if len(images) != len(prompts):
      raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    emb = self.clip.images(list(images))
    token = ref.subject.token
    out = {"clip_i": (emb @ ref.clip_real.T).mean(axis=1),
           "clip_t": metrics.rowwise_cosine(emb, self._texts([clip_prompt(p, token) for p in prompts]))}
    if self.dino is not None:
      out["dino"] = (self.dino.images(list(images)) @ ref.dino_real.T).mean(axis=1)
    pixel_copy = np.array([min_pixel_distance(img, ref.demo_pixels) < float(self.cfg.near_copy_pixel_threshold)
                           for img in images])
    clip_copy = (emb @ ref.demo_clip.T).max(axis=1) >= float(self.cfg.near_copy_clip_threshold)
    out["near_copy"] = (pixel_copy | clip_copy).astype(np.float64)
    if ref.candidates:
      out["identity_rank"] = metrics.identity_ranks(emb, ref.candidates, 0).astype(np.float64)
    if ref.toy is not None:
      options, truth = zip(*(toy_truth.background_options(p, ref.subject.cls) for p in prompts))
      option_emb = np.stack([self._texts(list(o)) for o in options])
      out["context_ok"] = (metrics.zero_shot_choice(emb, option_emb) == np.asarray(truth)).astype(np.float64)
    return out

  def real_renders(self, ref: SubjectReference, prompts: list[str]) -> np.ndarray | None:
    """Toy only: the true subject rendered in each prompt's context at the model's resolution (the ceiling)."""
    if ref.toy is None:
      return None
    return np.stack([toy_truth.prompt_render(ref.toy, p, self.size, variant=i) for i, p in enumerate(prompts)])


def summarize(per_image: dict[str, list[np.ndarray]]) -> dict[str, float]:
  """Means over every image of a method (DreamBench averages over all generated images)."""
  out = {}
  for name in PER_IMAGE:
    if per_image.get(name):
      values = np.concatenate(per_image[name])
      if name == "identity_rank":
        out["identity_accuracy"] = round(float(np.mean(values == 0)), 4)
        out["identity_mean_rank"] = round(float(np.mean(values)), 3)
      elif name == "context_ok":
        out["context_accuracy"] = round(float(np.mean(values)), 4)
      elif name == "near_copy":
        out["near_copy_rate"] = round(float(np.mean(values)), 4)
      else:
        out[name] = round(float(np.mean(values)), 4)
  return out
