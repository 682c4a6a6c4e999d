"""The metrics, as functions of L2-normalised embeddings (so every embedder and every method share them).

DreamBench (DreamBooth paper): DINO and CLIP-I are the mean pairwise cosine between generated and real images of
the subject; CLIP-T is the mean cosine between each image and its prompt (here with the identifier token removed,
which CLIP does not know). Toy world: identity retrieval asks whether the true subject has the highest CLIP-I
among M candidate subjects of the same class; context accuracy whether CLIP, shown the prompt with each possible
background, picks the background the prompt asked for.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _check(emb: np.ndarray, what: str) -> np.ndarray:
  emb = np.asarray(emb, np.float64)
  if emb.ndim != 2:
    raise ValueError(f"{what} must be [N, D] embeddings, got shape {emb.shape}")
  return emb


def mean_pairwise_cosine(generated: np.ndarray, real: np.ndarray) -> float:
  """Mean over all (generated, real) pairs of the cosine of normalised embeddings (CLIP-I, DINO)."""
  g, r = _check(generated, "generated"), _check(real, "real")
  if not len(g) or not len(r):
    raise ValueError("need at least one generated and one real embedding")
  return float((g @ r.T).mean())


def leave_one_out_cosine(real: np.ndarray) -> float:
  """Mean cosine over pairs of distinct real images: the 'real images' row of DreamBench."""
  r = _check(real, "real")
  n = len(r)
  if n < 2:
    raise ValueError("need at least two real images")
  sim = r @ r.T
  return float((sim.sum() - np.trace(sim)) / (n * (n - 1)))


def rowwise_cosine(images: np.ndarray, texts: np.ndarray) -> np.ndarray:
  """Cosine of image i with text i (CLIP-T per image)."""
  a, b = _check(images, "images"), _check(texts, "texts")
  if a.shape != b.shape:
    raise ValueError(f"image and text embeddings differ in shape: {a.shape} vs {b.shape}")
  return np.einsum("nd,nd->n", a, b)


def identity_ranks(generated: np.ndarray, candidates: Sequence[np.ndarray], true_index: int) -> np.ndarray:
  """Per generated image, the rank (0 = first) of the true candidate by mean cosine to each candidate's real
  images; ties count against the true subject (a constant image is never 'right')."""
  g = _check(generated, "generated")
  if not 0 <= true_index < len(candidates):
    raise ValueError(f"true_index {true_index} is not among {len(candidates)} candidates")
  scores = np.stack([(g @ _check(c, "candidate").T).mean(axis=1) if len(c) else np.full(len(g), -np.inf)
                     for c in candidates], axis=1)  # [N, M]: mean cosine to each candidate's real images
  true = scores[:, true_index:true_index + 1]
  others = np.delete(scores, true_index, axis=1)
  return (others >= true).sum(axis=1)


def zero_shot_choice(images: np.ndarray, options: np.ndarray) -> np.ndarray:
  """Index of the option text with the highest cosine, per image. options: [N, O, D] (per image) or [O, D]."""
  g = _check(images, "images")
  o = np.asarray(options, np.float64)
  if o.ndim == 2:
    return np.argmax(g @ o.T, axis=1)
  if o.ndim != 3 or o.shape[0] != len(g):
    raise ValueError(f"options must be [O, D] or [N, O, D] with N = {len(g)}, got shape {o.shape}")
  return np.argmax(np.einsum("nd,nod->no", g, o), axis=1)
