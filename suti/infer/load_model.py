"""A trained model from a checkpoint folder, for generation and evaluation.

Any checkpoint `suti train` or `suti export` wrote: a training workdir, its checkpoints/ folder, one step, or an
exported folder such as checkpoints/toy_suti. The config comes from the checkpoint itself, so the model is built
exactly as it was trained. `kind="apprentice"` / `"base"` checks what the caller needs and says so in one line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import ml_collections as mlc

from suti.checkpoint.model_from_checkpoint import model_from_checkpoint
from suti.core.paths import resolve_path
from suti.models.model import SuTIModel

KINDS = ("apprentice", "base")


@dataclass
class LoadedModel:
  model: SuTIModel
  cfg: mlc.ConfigDict
  path: str
  step: int

  @property
  def kind(self) -> str:
    return "apprentice" if int(self.cfg.model.num_neighbors) > 0 else "base"

  @property
  def image_size(self) -> int:
    """The side of the images the model makes (pixels, also for a latent model)."""
    return self.model.image_size


def load_model(path: str, *, kind: str | None = None) -> LoadedModel:
  """The model stored at `path` with its weights (EMA when the checkpoint has them); ValueError for a folder that
  is missing, holds no readable checkpoint, or holds the other kind of model than `kind`."""
  path = resolve_path(path)  # a relative path also works from outside the repository (checkpoints/...)
  if kind is not None and kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  model, cfg, meta = model_from_checkpoint(path)
  loaded_kind = "apprentice" if int(cfg.model.num_neighbors) > 0 else "base"
  if kind == "apprentice" and loaded_kind != "apprentice":
    raise ValueError(f"checkpoint {path} is a base text-to-image model (model.num_neighbors = 0); few-shot "
                     "generation needs a SuTI apprentice (e.g. checkpoints/toy_suti)")
  if kind == "base" and loaded_kind != "base":
    raise ValueError(f"checkpoint {path} is a SuTI apprentice; a base text-to-image model is needed here "
                     "(e.g. checkpoints/toy_base)")
  return LoadedModel(model, cfg, os.path.abspath(path), int(meta.get("step", 0)))
