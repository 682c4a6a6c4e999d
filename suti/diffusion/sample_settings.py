"""Sampler settings: a config's `sample` section with some settings replaced, the one rule every caller uses.

`suti generate` flags, `suti eval --config.sample.*`, the experts' render settings and `suti export --sample
KEY=VALUE` all come here: a None value keeps the section's own, a string is parsed and any value is cast to the
type of the one it replaces (as `--config.*` overrides are), and an unknown setting or sampler is a one-line error.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import ml_collections as mlc

from suti.config import apply_override

SAMPLERS = ("ddpm", "ddim", "dpm++")


def sample_settings(section: mlc.ConfigDict | Mapping, overrides: Mapping[str, Any] | None) -> mlc.ConfigDict:
  """A copy of `section` with `overrides` applied and checked."""
  sample_cfg = copy.deepcopy(section) if isinstance(section, mlc.ConfigDict) else mlc.ConfigDict(dict(section))
  for key, value in (overrides or {}).items():
    if value is None:
      continue
    if key not in sample_cfg:
      raise ValueError(f"unknown sample setting {key!r}; known: {', '.join(sorted(sample_cfg))}")
    apply_override(sample_cfg, key, value)
  if "sampler" in sample_cfg and sample_cfg.sampler not in SAMPLERS:
    raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sample_cfg.sampler!r}")
  if "steps" in sample_cfg and int(sample_cfg.steps) < 1:
    raise ValueError(f"steps must be >= 1, got {sample_cfg.steps}")
  return sample_cfg


def parse_settings(settings: list[str] | tuple[str, ...], known: Mapping) -> dict[str, str]:
  """["key=value", ...] (command-line form) -> {key: "value"}; the values are parsed by sample_settings."""
  parsed = {}
  for setting in settings:
    key, sep, value = setting.partition("=")
    if not sep:
      raise ValueError(f"--sample {setting!r}: expected KEY=VALUE, KEY one of {sorted(known)}")
    parsed[key] = value
  return parsed
