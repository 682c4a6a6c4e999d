"""`suti export --checkpoint RUN --out DIR`: a training run's weights as a small checkpoint to ship or share.

A training workdir holds the optimizer moments, the trained and the EMA weights of its last few steps (four copies
of the model each). An exported checkpoint holds one step: the EMA weights (or the trained ones with --no-ema)
as the `params` item and the run's `meta` (config, step), in the same Orbax layout as the trainer's checkpoints,
so `load_params`, `suti generate`, `suti eval` and `train.init_from` read it like any run:

  DIR/<step>/params/   the weights, float32
  DIR/<step>/meta/     {"config": ..., "step": ..., "exported_from": ...}

  suti export --checkpoint /tmp/toy_base --out checkpoints/toy_base
  suti export --checkpoint /tmp/toy_suti --out checkpoints/toy_suti \
      --sample text_scale=2.25 --sample neighbor_scale=2.25

`--format diffusers` writes a latent base model with CLIP text (a converted or trained Stable Diffusion) as a
diffusers StableDiffusionPipeline folder instead (suti/checkpoint/export_diffusers.py):

  suti export --format diffusers --checkpoint /ckpt/sd15_finetuned --out /models/sd15_finetuned

--sample KEY=VALUE sets a sampling default that generate and eval read from the checkpoint (config section
`sample`: sampler, steps, text_scale, neighbor_scale, ...); nothing that decides what the weights mean can change.
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import Sequence

import numpy as np

from suti.checkpoint.export_diffusers import clear_pipeline_folder, export_pipeline
from suti.checkpoint.model_from_checkpoint import model_from_checkpoint
from suti.checkpoint.store import Checkpointer, checkpoint_config, load_params
from suti.core.paths import resolve_path
from suti.core.errors import CommandParser, run_user_command
from suti.diffusion.sample_settings import parse_settings, sample_settings


def export_checkpoint(source: str, out_dir: str, *, prefer_ema: bool = True, overwrite: bool = False,
                      sample: Sequence[str] = ()) -> str:
  """Writes the weights of `source` (a workdir, its checkpoints/ folder or one step) to `out_dir`, with the
  `sample` settings ("key=value") as the checkpoint's sampling defaults; returns the step directory written."""
  weights, meta = load_params(source, prefer_ema=prefer_ema)
  checkpoint_config(meta, f"checkpoint {source}")  # a run's checkpoint: its config must be readable
  step = int(meta.get("step", 0))
  out = clear_checkpoint_folder(out_dir, overwrite)
  meta = dict(meta, exported_from=os.path.abspath(source), weights="ema" if prefer_ema else "params")
  meta["config"] = dict(meta["config"], sample=with_sample_settings(meta["config"].get("sample", {}), sample))
  meta["config"] = with_own_tokenizer(meta["config"], out)
  meta.pop("input_positions", None)  # a shipped checkpoint is not a place to resume training from
  return save_weights(out, step, weights, meta)


def clear_checkpoint_folder(out_dir: str, overwrite: bool) -> str:
  """The absolute `out_dir`, emptied of checkpoint steps (and its own tokenizer) when `overwrite`; ValueError
  when it holds a checkpoint and not `overwrite`."""
  out = os.path.abspath(out_dir)
  if os.path.isdir(out) and any(n.isdigit() for n in os.listdir(out)):
    if not overwrite:
      raise ValueError(f"{out_dir} already holds a checkpoint (pass --overwrite to replace it)")
    for name in os.listdir(out):
      if name.isdigit() or name == OWN_TOKENIZER:
        shutil.rmtree(os.path.join(out, name))
  return out


OWN_TOKENIZER = "tokenizer"  # the folder beside the steps that holds a checkpoint's Hugging Face tokenizer


def with_own_tokenizer(config: dict, out: str) -> dict:
  """`config` with its Hugging Face tokenizer (text.tokenizer, a folder) copied to `out`/tokenizer and named
  relative to `out`, so the checkpoint carries it (load_params makes the name absolute again)."""
  text = config.get("text", {})
  folder = text.get("tokenizer", "")
  if text.get("kind", "embedded") == "embedded" or not folder:
    return config
  if not os.path.isdir(folder):
    raise ValueError(f"text.tokenizer {folder} is not a folder")
  target = os.path.join(out, OWN_TOKENIZER)
  if os.path.abspath(folder) != os.path.abspath(target):
    shutil.copytree(folder, target, dirs_exist_ok=True)
  return dict(config, text=dict(text, tokenizer=OWN_TOKENIZER))


def with_sample_settings(section: dict, settings: Sequence[str]) -> dict:
  """`section` (the config's sample dict) with "key=value" settings applied, checked and cast as --config.* is."""
  return sample_settings(section, parse_settings(settings, section)).to_dict()


def save_weights(out_dir: str, step: int, weights: dict, meta: dict) -> str:
  """Writes nnx pure-dict weights and a meta dict (with "config") as one checkpoint step; returns its folder."""
  if not isinstance(meta.get("config"), dict):
    raise ValueError("a weights checkpoint needs meta['config'] (the model's config as a dict)")
  checkpointer = Checkpointer(os.path.abspath(out_dir), keep=1, async_save=False)
  try:
    checkpointer.save(int(step), {"params": _as_arrays(weights)}, dict(meta, step=int(step)))
    checkpointer.wait()
  finally:
    checkpointer.close()
  return os.path.join(os.path.abspath(out_dir), str(int(step)))


def _as_arrays(tree):
  return {k: _as_arrays(v) if isinstance(v, dict) else np.asarray(v) for k, v in tree.items()}


def main(argv: Sequence[str] | None = None) -> int:
  parser = CommandParser(prog="suti export", description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="a suti train workdir, its checkpoints/ or one step")
  parser.add_argument("--out", required=True, help="the folder to write (one step inside)")
  parser.add_argument("--format", choices=("project", "diffusers"), default="project",
                      help="project: a small checkpoint of this project; diffusers: a StableDiffusionPipeline folder")
  parser.add_argument("--no-ema", action="store_true", help="export the trained weights instead of the EMA")
  parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
  parser.add_argument("--sample", action="append", default=[], metavar="KEY=VALUE",
                      help="a sampling default stored with the weights (e.g. neighbor_scale=3.0); repeatable")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  if args.format == "diffusers":
    if args.no_ema or args.sample:
      raise ValueError("--no-ema and --sample apply to --format project only")
    clear_pipeline_folder(args.out, args.overwrite)
    model, cfg, _ = model_from_checkpoint(resolve_path(args.checkpoint))
    path = export_pipeline(model, cfg, args.out)
    print(f"suti export: {path} (a diffusers StableDiffusionPipeline folder)")
    return 0
  path = export_checkpoint(args.checkpoint, args.out, prefer_ema=not args.no_ema, overwrite=args.overwrite,
                           sample=args.sample)
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
  print(f"suti export: {path} ({size / 1e6:.1f} MB)")
  return 0


if __name__ == "__main__":
  sys.exit(run_user_command(main, sys.argv[1:], "suti export"))
