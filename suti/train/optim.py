"""Optimizers and learning-rate schedules from `config.train`."""
from __future__ import annotations

import ml_collections as mlc
import optax


def learning_rate_schedule(cfg_train: mlc.ConfigDict) -> optax.Schedule:
  """Linear warmup to train.lr, then cosine decay to 0 over the remaining train.steps."""
  warmup = max(int(cfg_train.warmup_steps), 0)
  decay = max(int(cfg_train.steps) - warmup, 1)
  return optax.warmup_cosine_decay_schedule(0.0, cfg_train.lr, warmup, warmup + decay, end_value=0.0)


def make_optimizer(cfg_train: mlc.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with the schedule above; global-norm clipping only when train.grad_clip > 0."""
  schedule = learning_rate_schedule(cfg_train)
  parts = []
  if cfg_train.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg_train.grad_clip))
  parts.append(optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=cfg_train.weight_decay))
  return optax.chain(*parts), schedule
