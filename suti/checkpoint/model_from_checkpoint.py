"""A SuTIModel with a checkpoint's weights, built from the config stored with them."""
from __future__ import annotations

import ml_collections as mlc
from flax import nnx

from suti.checkpoint.store import checkpoint_config, load_params
from suti.models.load_weights import load_weights
from suti.models.model import SuTIModel


def model_from_checkpoint(path: str) -> tuple[SuTIModel, mlc.ConfigDict, dict]:
  """(model, config, meta) of the checkpoint at `path` (EMA weights when it has them). The model is built
  abstractly, then every weight is filled in (strict): no random weights are made, which for a converted Stable
  Diffusion saves initialising a billion parameters only to overwrite them."""
  weights, meta = load_params(path)
  cfg = checkpoint_config(meta, f"checkpoint {path}")
  model = nnx.eval_shape(lambda: SuTIModel(cfg, rngs=nnx.Rngs(0)))
  load_weights(model, weights, source=f"checkpoint {path}", strict=True)
  return model, cfg, meta
