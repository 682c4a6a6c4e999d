"""`suti info --config FILE [--config.key=value ...]`: the resolved config and parameter counts.

Counts come from `jax.eval_shape`, so even SD-1.5-sized models are counted without allocating weights.
"""
from __future__ import annotations

import sys
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from suti.config import flatten, load_config, split_overrides
from suti.core.errors import CommandParser, run_user_command
from suti.models.model import vae_config
from suti.models.text_encoder import build_text_encoder
from suti.models.unet import count_params
from suti.models.unet_config import UNetConfig
from suti.models.vae import AutoencoderKL


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def text_encoder_params(cfg_text) -> int | None:
  """Parameters of the configured text encoder, or None when it is external and not given by path."""

  if cfg_text.kind != "embedded" and not cfg_text.checkpoint:
    return None
  abstract = nnx.eval_shape(lambda: build_text_encoder(cfg_text, rngs=nnx.Rngs(0)))
  return _count(nnx.state(abstract, nnx.Param))


def describe(config_path: str, overrides: Sequence[tuple[str, str]] = ()) -> str:

  cfg = load_config(config_path, overrides)
  counts = count_params(UNetConfig.from_config(cfg.model))
  lines = [f"# config: {config_path}"]
  lines += [f"{key} = {value!r}" for key, value in flatten(cfg)]
  lines += ["", "# parameters (UNet)"]
  total = counts.pop("total")
  for name, n in counts.items():
    lines.append(f"{name:<24} {n:>15,}")
  lines.append(f"{'total':<24} {total:>15,}")
  text = text_encoder_params(cfg.text)
  lines.append("")
  if text is None:
    lines.append(f"text encoder ({cfg.text.kind}): external, set text.checkpoint to count it")
  else:
    lines.append(f"text encoder ({cfg.text.kind}): {text:,}{'' if cfg.text.trainable else ' (frozen)'}")
  vae = vae_config(cfg)
  if vae is not None:
    count = _count(nnx.state(nnx.eval_shape(lambda: AutoencoderKL(vae, rngs=nnx.Rngs(0))), nnx.Param))
    lines.append(f"vae: {count:,} (frozen; {vae.downsample_factor}x downsampling, {vae.latent_channels} latent "
                 f"channels: {int(cfg.model.image_size) * vae.downsample_factor} px images)")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  overrides, rest = split_overrides(sys.argv[1:] if argv is None else argv)
  parser = CommandParser(prog="suti info", description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True,
                      help="config file, e.g. configs/toy.py; a relative path "
                           "not in the working folder resolves against the installed package's configs/")
  args = parser.parse_args(rest)
  print(describe(args.config, overrides))
  return 0


if __name__ == "__main__":
  sys.exit(run_user_command(main, sys.argv[1:], "suti info"))
