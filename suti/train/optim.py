"""Optimizers and learning-rate schedules from `config.train`.

train.optimizer: "adamw" or "adafactor" (SuTI trained both its apprentice and its experts with Adafactor).
Adafactor runs with `multiply_by_parameter_scale=False`, so train.lr is an absolute step size for both.
train.lr_schedule: "cosine" (linear warmup, then cosine to 0 at train.steps) or "constant" (warmup, then flat).
Gradient clipping to train.grad_clip happens exactly when train.clip_grad is True.
"""
from __future__ import annotations

import ml_collections as mlc
import optax

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "constant")


def learning_rate_schedule(cfg_train: mlc.ConfigDict) -> optax.Schedule:
  warmup = max(int(cfg_train.warmup_steps), 0)
  kind = cfg_train.get("lr_schedule", "cosine")
  if kind == "cosine":
    decay = max(int(cfg_train.steps) - warmup, 1)
    return optax.warmup_cosine_decay_schedule(0.0, cfg_train.lr, warmup, warmup + decay, end_value=0.0)
  if kind == "constant":
    if warmup == 0:
      return optax.constant_schedule(cfg_train.lr)
    return optax.join_schedules([optax.linear_schedule(0.0, cfg_train.lr, warmup),
                                 optax.constant_schedule(cfg_train.lr)], [warmup])
  raise ValueError(f"train.lr_schedule must be one of {SCHEDULES}, got '{kind}'")


def make_optimizer(cfg_train: mlc.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(cfg_train)
  parts = []
  if cfg_train.get("clip_grad", cfg_train.grad_clip > 0):
    if cfg_train.grad_clip <= 0:
      raise ValueError(f"train.clip_grad is on but train.grad_clip={cfg_train.grad_clip} is not positive")
    parts.append(optax.clip_by_global_norm(cfg_train.grad_clip))
  kind = cfg_train.get("optimizer", "adamw")
  if kind == "adamw":
    parts.append(optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=cfg_train.weight_decay))
  elif kind == "adafactor":
    parts.append(optax.adafactor(schedule, multiply_by_parameter_scale=False,
                                 weight_decay_rate=cfg_train.weight_decay or None))
  else:
    raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got '{kind}'")
  return optax.chain(*parts), schedule
