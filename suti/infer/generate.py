"""`suti generate`: few-shot generation from 1-5 demonstration images of a subject and a prompt, or text-to-image
from a base model (no --demo).

  suti generate --checkpoint checkpoints/toy_suti --demo a.png --demo b.png --demo c.png \
      --prompt "a sks ball on the beach" --out out.png [--seed 0] [--steps 50] [--sampler ddim|dpm++|ddpm] \
      [--text-scale 2.25] [--neighbor-scale 2.25] [--num-images 4] [--demo-caption "..." ...]
  suti generate --checkpoint checkpoints/toy_base --prompt "a red ball on the beach" --out ball.png
  suti generate --checkpoint /ckpt/sd15 --prompt "a dog" --out dog.png --init-noise x_T.npy   # reproducible x_T

Writes out.png (with --num-images N > 1: out_0.png ... out_{N-1}.png) at the model's resolution, and
out_sheet.png: the demos as the model sees them | the outputs, enlarged. Demos may be of any size and format;
they are resized and center-cropped like training neighbors. The neighbor tokens are computed once per call.
Without --demo-caption each demo is captioned "a photo of a <noun>", the noun following the identifier token
(--token, default "sks") in the prompt, as the data pipeline captions images whose alt text says nothing.
--init-noise FILE.npy starts every chain from a given x_T instead of the seed's: float32 [N, h, w, c] (NHWC, one
per image; latents for a latent model), e.g. diffusers' `latents` transposed from NCHW, so runs can be
reproduced across frameworks.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

import numpy as np
from tqdm import tqdm

from suti.core.errors import CommandParser, run_user_command
from suti.core.image_ops import resize_and_crop
from suti.core.png import save_png
from suti.infer.demos import MAX_DEMOS, check_demo_count, default_caption, read_image
from suti.infer.load_model import load_model
from suti.infer.sampler import Sampler
from suti.viz.contact_sheet import contact_sheet


def build_parser() -> argparse.ArgumentParser:
  parser = CommandParser(prog="suti generate", description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True,
                      help="a SuTI apprentice, or a base model for text-to-image (suti train workdir, export or "
                           "convert); "
                           "a relative path not in the working folder resolves against the shipped checkpoints/")
  parser.add_argument("--demo", action="append", default=[], metavar="FILE",
                      help=f"a demonstration image (1 to {MAX_DEMOS}; 3 is standard); repeat the flag")
  parser.add_argument("--demo-caption", action="append", default=None, metavar="TEXT",
                      help="a caption per demo, in --demo order (default: 'a photo of a <noun>')")
  parser.add_argument("--prompt", required=True, help='e.g. "a sks ball on the beach"')
  parser.add_argument("--out", required=True, help="output PNG path")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's config)")
  parser.add_argument("--sampler", choices=("ddim", "dpm++", "ddpm"), default=None)
  parser.add_argument("--text-scale", type=float, default=None, help="text guidance scale")
  parser.add_argument("--neighbor-scale", type=float, default=None, help="demo (neighbor) guidance scale")
  parser.add_argument("--num-images", type=int, default=1)
  parser.add_argument("--init-noise", metavar="FILE.npy", default=None,
                      help="x_T per image, float32 [N, h, w, c] NHWC (latents for a latent model)")
  parser.add_argument("--token", default="sks", help="the identifier token the prompt uses for the subject")
  parser.add_argument("--no-progress", action="store_true")
  return parser


def output_paths(out: str, count: int) -> list[str]:
  stem, ext = os.path.splitext(out)
  ext = ext or ".png"
  return [stem + ext] if count == 1 else [f"{stem}_{i}{ext}" for i in range(count)]


def sheet_path(out: str) -> str:
  return os.path.splitext(out)[0] + "_sheet.png"


def read_init_noise(path: str) -> np.ndarray:
  """The --init-noise array (float32); one-line errors for a missing or unreadable file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--init-noise {path} does not exist")
  try:
    noise = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as err:
    raise ValueError(f"--init-noise {path} is not a .npy array ({str(err).splitlines()[0]})") from None
  if noise.dtype.kind != "f" or not np.isfinite(noise).all():
    raise ValueError(f"--init-noise {path} must hold finite floats, got dtype {noise.dtype}")
  return noise.astype(np.float32)


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
  if not args.prompt.strip():
    raise ValueError("--prompt is empty")
  if args.num_images < 1:
    raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
  if not args.out.lower().endswith(".png"):
    raise ValueError(f"--out must be a .png path, got {args.out}")
  if len(args.demo) > MAX_DEMOS:
    check_demo_count(len(args.demo), MAX_DEMOS)
  if args.demo_caption is not None and len(args.demo_caption) != len(args.demo):
    raise ValueError(f"{len(args.demo)} demos but {len(args.demo_caption)} --demo-caption values")
  demos = [read_image(path) for path in args.demo]  # bad files fail here, before the model loads
  init_noise = read_init_noise(args.init_noise) if args.init_noise else None

  start = time.perf_counter()
  loaded = load_model(args.checkpoint)
  if loaded.kind == "apprentice":
    check_demo_count(len(demos), int(loaded.cfg.model.num_neighbors))
  elif demos:
    raise ValueError(f"checkpoint {loaded.path} is a base text-to-image model (model.num_neighbors = 0): it takes "
                     "no --demo; leave them out to sample text-to-image, or pass a SuTI apprentice")
  captions = args.demo_caption or [default_caption(args.prompt, args.token)] * len(demos)
  sampler = Sampler.for_loaded(loaded, batch_size=args.num_images, sample_overrides={
      "steps": args.steps, "sampler": args.sampler, "text_scale": args.text_scale,
      "neighbor_scale": args.neighbor_scale})
  s = sampler.sample_cfg
  few_shot = dict(demos=[demos] * args.num_images, demo_captions=[captions] * args.num_images) if demos else {}
  with tqdm(total=args.num_images, desc="generate", unit="img", disable=args.no_progress) as bar:
    images = sampler.sample([args.prompt] * args.num_images, args.seed, init_noise=init_noise, progress=bar,
                            **few_shot)
  paths = output_paths(args.out, args.num_images)
  for path, image in zip(paths, images):
    save_png(path, image)
  model_demos = [resize_and_crop(d, loaded.image_size) for d in demos]
  groups = [model_demos, list(images)] if demos else [list(images)]
  sheet = contact_sheet([groups], captions=[args.prompt], scale=max(1, 64 // loaded.image_size))
  save_png(sheet_path(args.out), sheet)
  what = f"from {len(demos)} demos" if demos else "text-to-image"
  guidance = f"text scale {s.text_scale}" + (f", neighbor scale {s.neighbor_scale}" if demos else "")
  start_from = f"x_T from {args.init_noise}" if init_noise is not None else f"seed {args.seed}"
  print(f"suti generate: {len(images)} image(s) {loaded.image_size}x{loaded.image_size} {what}, "
        f"{s.sampler} {s.steps} steps, {guidance}, {start_from}, "
        f"{time.perf_counter() - start:.1f} s -> {paths[0] if len(paths) == 1 else os.path.dirname(paths[0]) or '.'}"
        f" (sheet {sheet_path(args.out)})")
  return 0


if __name__ == "__main__":
  sys.exit(run_user_command(main, sys.argv[1:], "suti generate"))
