"""Toy-world ground truth for evaluation: which subject a benchmark folder shows, its same-class distractors, and
what the prompt asked for. The toy world is a pure function of (subject, context), so evaluation can render any
subject anywhere; the pipeline and the models never see any of this.
"""
from __future__ import annotations

import numpy as np

from suti.core.hashing import stable_int
from suti.core.image_ops import resize_and_crop
from suti.toy import world as tw


def toy_subject(name: str, cls: str) -> tw.Subject | None:
  """The toy subject a benchmark folder name stands for, or None when it is not a toy benchmark subject."""
  try:
    subject = tw.Subject.from_id(name)
  except ValueError:
    return None
  return subject if subject.cls == cls else None


def _rank(*parts: str) -> int:
  return stable_int(*parts)


def distractors(subject: tw.Subject, count: int) -> list[tw.Subject]:
  """`count` other held-out subjects of the same class, picked by a fixed hash (the same on every run)."""
  pool = [s for s in tw.subjects_of_split("heldout") if s.shape == subject.shape and s != subject]
  pool.sort(key=lambda s: _rank(subject.id, s.id))
  if count > len(pool):
    raise ValueError(f"only {len(pool)} held-out {subject.shape} subjects besides {subject.id}; asked for {count}")
  return pool[:count]


def reference_renders(subject: tw.Subject, count: int, size: int) -> list[np.ndarray]:
  """Reference images like the benchmark's own (photos, no accessories, random backgrounds and poses)."""
  rng = np.random.default_rng(_rank("references", subject.id))
  return [tw.render(subject, tw.sample_context(rng, style_p=0.0, accessory_p=0.0), size) for _ in range(count)]


def prompt_render(subject: tw.Subject, prompt: str, size: int, variant: int = 0) -> np.ndarray:
  """The subject in exactly the context the prompt names, at `size` pixels: a real image the prompt describes
  (rendered at the nearest toy size at or above `size`, then resized like a demo)."""
  context = tw.prompt_context(prompt)
  render_size = next((s for s in tw.SIZES_PX if s >= size), tw.SIZES_PX[-1])
  image = tw.render(subject, tw.Context(context.background, context.position, context.size, context.style,
                                        context.accessory, variant), render_size)
  return resize_and_crop(image, size)


def background_options(prompt: str, cls: str) -> tuple[list[str], int]:
  """The prompt rewritten with each background (nothing else changed, no identifier token) and the index of the
  background it asks for: the choices of the zero-shot context test."""
  context = tw.prompt_context(prompt)
  options = [tw.prompt_for(cls, tw.Context(b, context.position, context.size, context.style, context.accessory))
             for b in tw.BACKGROUNDS]
  return options, tw.BACKGROUNDS.index(context.background)
