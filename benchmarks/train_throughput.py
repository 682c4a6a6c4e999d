"""Training throughput of the trainer's sharded step: img/s, img/s and TFLOP/s per device, MFU where the peak is known.

  python benchmarks/train_throughput.py                                   # toy (16x16) and imagen64 on this CPU
  python benchmarks/train_throughput.py --models sd15 --dtype bfloat16 --batch 32   # on a GPU: SD-1.5 UNet MFU

Each model runs the exact step `suti train` compiles (mesh over every local device, sharding rules, EMA, donated
state, ahead-of-time compiled) on a synthetic batch already on the devices, so the figure is the step alone (the
input pipeline runs ahead in its own thread during training). The peer measured in the same run is the plain
single-device `jax.jit` step (`build_trainer`): `trainer_vs_plain_step` = trainer img/s / plain img/s shows what
the machinery at scale costs on one device (~1.0 expected). FLOPs come from XLA's cost analysis of the compiled
program (per device). A frozen external text encoder (T5, CLIP) without a local checkpoint is replaced by the
embedded one at the UNet's context width: the UNet dominates the step either way.
Ends with one JSON line: per model img_per_s, img_per_s_per_device, tflops_per_device, mfu (null without a
known peak), trainer_vs_plain_step, params.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from suti.config import load_config  # noqa: E402
from suti.diffusion.schedules import make_schedule  # noqa: E402
from suti.models.model import null_text  # noqa: E402
from suti.train import mesh as mesh_lib  # noqa: E402
from suti.train.optim import make_optimizer  # noqa: E402
from suti.train.step import build_trainer, make_train_step, split_model, step_rng  # noqa: E402
from suti.train.trainer import build_model, compile_step, sharded_train_state, step_flops  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Dense bf16 peak TFLOP/s per device, by jax's device_kind (vendor data sheets).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
                    "TPU v5p": 459.0, "TPU v6 lite": 918.0}


def peak_tflops(dtype: str) -> float | None:
  if dtype != "bfloat16":
    return None
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_BF16_TFLOPS.items():
    if name.lower() in kind.lower():
      return peak
  return None


def bench_config(name: str, batch: int, dtype: str):
  overrides = [("model.dtype", dtype), ("train.batch_size", str(batch)), ("mesh.data", "-1"), ("mesh.fsdp", "1"),
               ("train.warmup_steps", "10")]
  cfg = load_config(os.path.join(ROOT, "configs", f"{name}.py"), overrides)
  if cfg.text.kind != "embedded" and not cfg.text.checkpoint:
    cfg.text.kind, cfg.text.width, cfg.text.layers, cfg.text.trainable = "embedded", cfg.model.cross_attention_dim, 1, False
  return cfg


def synthetic_batch(model, cfg, batch: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  s = cfg.model.image_size
  ids, mask = model.tokenize(["a photo of a red teapot on the beach"] * batch)
  out = {"images": rng.uniform(-1, 1, (batch, s, s, cfg.model.in_channels)).astype(np.float32),
         "ids": ids, "text_mask": mask}
  k = cfg.model.num_neighbors
  if k:
    n_ids, n_mask = model.tokenize(["a red teapot"] * batch * k)
    out.update(neighbor_images=rng.uniform(-1, 1, (batch, k, s, s, cfg.model.in_channels)).astype(np.float32),
               neighbor_ids=n_ids.reshape(batch, k, -1), neighbor_text_mask=n_mask.reshape(batch, k, -1),
               neighbor_mask=np.ones((batch, k), bool))
  return out


def timed(step, state, batch, steps: int) -> tuple[float, object]:
  for _ in range(2):  # warm-up (the first call may still allocate)
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  return time.perf_counter() - start, state


def measure(name: str, batch: int, steps: int, dtype: str, baseline: bool) -> dict:
  cfg = bench_config(name, batch, dtype)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  mesh_lib.check_batch_size(batch, mesh)
  model = build_model(cfg)
  tx, lr = make_optimizer(cfg.train)
  graphdef, params, frozen = split_model(model, cfg)
  n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
  state, shardings = sharded_train_state(params, frozen, tx, cfg, mesh)
  null_ids, null_mask = null_text(model, 1)
  step = make_train_step(graphdef, tx, make_schedule(cfg.diffusion), cfg, null_ids, null_mask, lr)
  host_batch = synthetic_batch(model, cfg, batch)
  device_batch = mesh_lib.global_batch(host_batch, mesh)
  began = time.perf_counter()
  compiled = compile_step(lambda s, b: step(s, b, step_rng(s)), state, shardings, device_batch, mesh)
  compile_s = time.perf_counter() - began
  flops = step_flops(compiled)
  seconds, state = timed(compiled, state, device_batch, steps)
  del state
  img_per_s = steps * batch / seconds
  tflops = flops * steps / seconds / 1e12
  peak = peak_tflops(dtype)
  row = {"model": name, "image_size": cfg.model.image_size, "params": n_params, "batch": batch, "dtype": dtype,
         "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind, "compile_s": round(compile_s, 1),
         "img_per_s": round(img_per_s, 2), "img_per_s_per_device": round(img_per_s / jax.device_count(), 2),
         "gflop_per_step_per_device": round(flops / 1e9, 2), "tflops_per_device": round(tflops, 4),
         "mfu": None if peak is None else round(tflops / peak, 4)}
  if baseline:
    _, plain_state, plain_step = build_trainer(cfg, build_model(cfg), make_schedule(cfg.diffusion))
    plain_batch = {k: jax.device_put(v, jax.devices()[0]) for k, v in host_batch.items()}
    key = jax.random.key(0)
    plain_seconds, _ = timed(lambda s, b: plain_step(s, b, key), plain_state, plain_batch, steps)
    row["plain_img_per_s"] = round(steps * batch / plain_seconds, 2)
    row["trainer_vs_plain_step"] = round(img_per_s / row["plain_img_per_s"], 3)
  print(" ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr, flush=True)
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="toy,imagen64", help="comma list of configs/<name>.py")
  parser.add_argument("--batch", type=int, default=0, help="global batch (default: 32 for toy, 2 otherwise)")
  parser.add_argument("--steps", type=int, default=0, help="timed steps (default: 20 for toy, 3 otherwise)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--no-baseline", action="store_true", help="skip the plain single-device step")
  args = parser.parse_args()
  rows = []
  for name in args.models.split(","):
    small = name.startswith("toy")
    batch = args.batch or (32 if small else 2)
    batch = max(batch // jax.device_count(), 1) * jax.device_count()
    steps = args.steps or (20 if small else 3)
    # the plain-step peer holds a second copy of weights and optimizer: measured for the small models only
    baseline = small and not args.no_baseline and jax.device_count() == 1
    rows.append(measure(name, batch, steps, args.dtype, baseline=baseline))
  print(json.dumps({"backend": jax.default_backend(), "results": rows}))


if __name__ == "__main__":
  main()
