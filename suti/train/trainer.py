"""The trainer: base text-to-image pretraining and SuTI apprentice training, from a config and a workdir.

  suti train --config configs/toy.py --workdir /tmp/toy_base --config.data.shards='/tmp/toyweb/*.tar'

One loop for every scale. What happens, in order:
1. the mesh (`mesh.data` x `mesh.fsdp`) over the devices of every process;
2. the model, built on the host (the same seed on every host gives the same weights), optionally initialised
   from a base run (`train.init_from`), placed on the mesh by the sharding rules; optimizer state and EMA are
   created directly with those shardings;
3. the newest readable checkpoint in `<workdir>/checkpoints` is restored if there is one: weights, optimizer
   state, EMA, step, RNG and every host's input position, so the run continues exactly where it stopped;
4. the train step is compiled once (ahead of time, donated state) and its FLOPs read from XLA's cost analysis;
5. each step: the host's slice of the batch -> global arrays -> step; metrics of step n are read while step n+1
   runs; a non-finite loss stops the run naming the step; SIGTERM saves a checkpoint and exits;
6. `metrics.jsonl` + TensorBoard every `train.log_every` steps, a sample grid every `train.sample_every` steps,
   checkpoints every `train.checkpoint_every` steps and at the end.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from suti.checkpoint.store import Checkpointer, load_params
from suti.core.paths import resolve_path
from suti.diffusion.schedules import make_schedule
from suti.infer.sampling import make_sample_fn
from suti.models.convert_vae import load_diffusers_vae_into
from suti.models.load_weights import load_weights
from suti.models.model import SuTIModel, null_text
from suti.train import mesh as mesh_lib
from suti.train.input_pipeline import InputPosition, TrainInput
from suti.train.metrics_writer import MetricsWriter
from suti.train.optim import make_optimizer
from suti.train.preemption import PreemptionWatcher
from suti.train.sharding import describe, tree_shardings
from suti.train.step import TrainState, init_train_state, make_train_step, split_model, step_rng
from suti.viz.sample_grid import sample_grid, sample_grid_path, save_sample_grid


class NonFiniteLossError(ValueError):
  """The loss or the gradient norm became NaN or infinite (a user-facing error: the run stops)."""


@dataclasses.dataclass
class TrainResult:
  step: int  # the step the run stopped at
  stopped_by: str  # "done" | "preempted"
  workdir: str
  last_loss: float


def data_format(cfg: mlc.ConfigDict) -> str:
  fmt = cfg.data.get("format", "auto")
  if fmt == "auto":
    return "icl" if cfg.model.num_neighbors > 0 else "pairs"
  if fmt not in ("pairs", "icl"):
    raise ValueError(f"data.format must be auto, pairs or icl, got '{fmt}'")
  if fmt == "icl" and cfg.model.num_neighbors == 0:
    raise ValueError("data.format=icl needs an apprentice model (model.num_neighbors > 0)")
  return fmt


def build_model(cfg: mlc.ConfigDict) -> SuTIModel:
  """The model on the host CPU: identical on every host for the same seed; placed on the mesh afterwards."""
  cpu = jax.local_devices(backend="cpu")[0]
  with jax.default_device(cpu):
    model = SuTIModel(cfg, rngs=nnx.Rngs(cfg.train.seed))
    vae_folder = cfg.get("vae", {}).get("checkpoint", "")
    if model.vae is not None and vae_folder:
      load_diffusers_vae_into(model.vae, resolve_path(vae_folder))
    if cfg.train.get("init_from", ""):
      weights, _ = load_params(cfg.train.init_from)
      load_weights(model, weights)
    elif model.vae is not None and not vae_folder:
      raise ValueError("a latent model (vae.enabled) needs its VAE's weights: set vae.checkpoint (a diffusers vae/ "
                       "folder) or train.init_from (a checkpoint that has them, e.g. from suti convert diffusers)")
  return model


def place(tree: Any, shardings: Any) -> Any:
  """Host arrays -> global arrays with the given shardings (every host holds the same full values)."""
  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree, shardings)


def sharded_train_state(params: Any, frozen: Any, tx, cfg: mlc.ConfigDict, mesh) -> tuple[TrainState, Any]:
  """(state, shardings): host weights placed on the mesh by the sharding rules; optimizer state and EMA created
  directly with their shardings (never materialised whole on one device)."""
  abstract = jax.eval_shape(lambda p, f: init_train_state(p, f, tx, cfg), params, frozen)
  shardings = tree_shardings(abstract, mesh, cfg.mesh)
  init = jax.jit(lambda p, f: init_train_state(p, f, tx, cfg), out_shardings=shardings)
  return init(place(params, shardings.params), place(frozen, shardings.frozen)), shardings


def compile_step(step_fn, state: TrainState, state_shardings: Any, batch: dict[str, jax.Array], mesh):
  """Ahead-of-time compiled step(state, batch) -> (state, metrics), state donated: compiled once per run."""
  batch_shardings = {k: v.sharding for k, v in batch.items()}
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
  return jitted.lower(state, batch).compile()


class Trainer:
  """Holds what one run needs; `run()` is the loop."""

  def __init__(self, cfg: mlc.ConfigDict, workdir: str, *, progress: bool | None = None):
    if not cfg.data.shards:
      raise ValueError("data.shards is empty: pass --config.data.shards=PATH_OR_GLOB")
    self.cfg, self.workdir = cfg, workdir
    self.primary = jax.process_index() == 0
    self.progress = sys.stderr.isatty() if progress is None else progress
    self.mesh = mesh_lib.make_mesh(cfg.mesh)
    mesh_lib.check_batch_size(cfg.train.batch_size, self.mesh, cfg.train.get("grad_accum_steps", 1))
    self.kind = data_format(cfg)
    self.schedule = make_schedule(cfg.diffusion)

    model = build_model(cfg)
    self.model = model
    self.tx, self.lr_schedule = make_optimizer(cfg.train)
    self.graphdef, params, frozen = split_model(model, cfg)
    null_ids, null_mask = null_text(model, 1)

    self.state, self.state_shardings = sharded_train_state(params, frozen, self.tx, cfg, self.mesh)
    self.sharding_summary = describe(self.state_shardings.params, self.state.params)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state, self.state_shardings)

    step = make_train_step(self.graphdef, self.tx, self.schedule, cfg, jnp.asarray(null_ids),
                           jnp.asarray(null_mask), self.lr_schedule)
    self._step_fn = lambda state, batch: step(state, batch, step_rng(state))
    self.checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(cfg.train.keep_checkpoints),
                                     async_save=bool(cfg.train.get("async_checkpoints", True)))
    self.compiled = None
    self.flops_per_step = 0.0
    self._last_log = (0, time.perf_counter())  # (step, time) of the last metrics line: img/s over the window
    self._skipped = 0

  # ----- input -----------------------------------------------------------------------------------------------

  def make_input(self, position: InputPosition | None) -> TrainInput:
    cfg = self.cfg
    return TrainInput(cfg.data.shards, kind=self.kind, image_size=self.model.image_size,
                      batch_size=cfg.train.batch_size // jax.process_count(), tokenize=self.model.tokenize,
                      num_neighbors=cfg.model.num_neighbors, seed=cfg.train.seed,
                      process_index=jax.process_index(), process_count=jax.process_count(),
                      shuffle_buffer=int(cfg.data.shuffle_buffer), prefetch=int(cfg.data.prefetch),
                      position=position)

  def all_positions(self, position: InputPosition) -> list[list[int]]:
    """Every host's input position ([process][epoch, consumed]), so each resumes its own stream."""
    local = position.to_array().astype(np.int64)
    if jax.process_count() == 1:
      return [local.tolist()]
    return np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 2).tolist()

  # ----- checkpoints -----------------------------------------------------------------------------------------

  def restore(self) -> InputPosition | None:
    restored = self.checkpointer.restore(self.abstract_state)
    if restored is None:
      return None
    step, self.state, meta = restored
    positions = meta.get("input_positions") or []
    if len(positions) != jax.process_count():
      raise ValueError(f"the checkpoint at step {step} was written by {len(positions)} processes, this run has "
                       f"{jax.process_count()}: resume with the same number of hosts")
    return InputPosition.from_array(np.asarray(positions[jax.process_index()]))

  def save(self, position: InputPosition) -> None:
    """Starts an async save of the current state (a no-op when this step is already saved)."""
    step = int(jax.device_get(self.state.step))
    if self.checkpointer.latest_step() == step:
      return
    meta = {"step": step, "input_positions": self.all_positions(position), "seed": int(self.cfg.train.seed),
            "config": json.loads(self.cfg.to_json_best_effort()), "kind": self.kind,
            "num_neighbors": int(self.cfg.model.num_neighbors)}
    self.checkpointer.save(step, self.state, meta)

  # ----- compile ---------------------------------------------------------------------------------------------

  def compile(self, batch: dict[str, jax.Array]) -> None:
    self.compiled = compile_step(self._step_fn, self.state, self.state_shardings, batch, self.mesh)
    self.flops_per_step = step_flops(self.compiled)

  # ----- the loop --------------------------------------------------------------------------------------------

  def run(self, max_steps: int | None = None) -> TrainResult:
    """Trains to train.steps (or stops after `max_steps` more steps: for tests and benchmarks)."""
    cfg = self.cfg
    total = int(cfg.train.steps)
    position = self.restore()
    start = int(jax.device_get(self.state.step))
    self.writer = MetricsWriter(self.workdir, enabled=self.primary, resume_step=start or None)
    if self.primary:
      what = f"resumed at step {start}" if start else "new run"
      if self.writer.dropped_lines:
        what += f" (dropped {self.writer.dropped_lines} metric lines logged after that checkpoint)"
      log(f"{what}; mesh {dict(self.mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} "
          f"processes; params sharded {self.sharding_summary['sharded']:,}, replicated "
          f"{self.sharding_summary['replicated']:,}; data {self.kind}")
    if not start:
      self.writer.write_text(0, "config", cfg.to_json_best_effort(indent=2))
    end = total if max_steps is None else min(total, start + max_steps)
    if start >= end:
      self.checkpointer.close()
      self.writer.close()
      return TrainResult(start, "done", self.workdir, float("nan"))

    data = self.make_input(position)
    key_log = None
    if cfg.data.get("log_keys", False):
      key_log = open(os.path.join(self.workdir, f"input_keys.process{jax.process_index()}.jsonl"), "a")
    preview = PreviewSampler(self) if cfg.train.get("sample_every", 0) > 0 else None
    stopped_by, last_loss = "done", float("nan")
    pending: tuple[int, dict] | None = None
    bar = None
    if self.progress and self.primary:
      bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
    try:
      with PreemptionWatcher() as watcher:
        for step in range(start, end):
          local = next(data)
          keys = local.pop("keys", None)
          local.pop("texts", None)  # host-side strings: sample keys and captions are not model inputs
          if key_log is not None:
            key_log.write(json.dumps({"step": step + 1, "keys": [str(k) for k in keys]}) + "\n")
          if self.compiled is None:
            warn_truncated_captions(local["text_mask"], int(cfg.text.max_length))
          batch = mesh_lib.global_batch(local, self.mesh)
          if self.compiled is None:
            self.compile(batch)
            self._last_log = (start, time.perf_counter())
          self.state, metrics = self.compiled(self.state, batch)
          self._skipped = sum(data.counters.values())
          if pending is not None:  # read step n-1 while step n runs
            last_loss = self.check_and_log(*pending, bar)
          pending = (step + 1, metrics)
          done = step + 1
          if done % int(cfg.train.checkpoint_every) == 0 and done < end:
            self.save(data.position)
          if preview is not None and done % int(cfg.train.sample_every) == 0:
            began = time.perf_counter()
            preview.write(done)
            last_step, last_time = self._last_log  # sampling time does not count against img/s
            self._last_log = (last_step, last_time + time.perf_counter() - began)
          if watcher.should_stop(done) and done < end:
            stopped_by = "preempted"
            break
        if pending is not None:
          last_loss = self.check_and_log(*pending, bar, force=stopped_by != "done")
        self.save(data.position)
        if preview is not None and stopped_by == "done" and end % int(cfg.train.sample_every):
          preview.write(end)
    finally:
      data.close()
      if key_log is not None:
        key_log.close()
      if bar is not None:
        bar.close()
      self.checkpointer.wait()
      self.checkpointer.close()
      self.writer.close()
    step = int(jax.device_get(self.state.step))
    counters = dict(data.counters)
    if self.primary or jax.process_count() > 1:
      skipped = f"; samples skipped (all passes over the data) {counters}" if counters else ""
      if stopped_by == "preempted":
        log(f"stopped by SIGTERM at step {step}; checkpoint saved; run the same command to resume{skipped}")
      else:
        log(f"step {step}/{total}, loss {last_loss:.4f}; checkpoints in {self.checkpointer.directory}, "
            f"metrics in {os.path.join(self.workdir, 'metrics.jsonl')}{skipped}")
    return TrainResult(step, stopped_by, self.workdir, last_loss)

  def check_and_log(self, step: int, metrics: dict, bar, force: bool = False) -> float:
    """Reads one step's metrics: stops on a non-finite loss, logs every train.log_every steps."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if values.pop("nonfinite"):
      raise NonFiniteLossError(
          f"non-finite loss ({values['loss']}) or gradient norm ({values['grad_norm']}) at step {step}; the update "
          f"was not applied and the run stops (last checkpoint: step {self.checkpointer.latest_step()}). Lower "
          "train.lr, keep train.clip_grad on, or check the data")
    if bar is not None:
      bar.update(step - bar.n)
      bar.set_postfix(loss=f"{values['loss']:.4f}")
    if step % int(self.cfg.train.log_every) == 0 or force:
      (last_step, last_time), now = self._last_log, time.perf_counter()
      steps_per_s = (step - last_step) / max(now - last_time, 1e-9)
      self._last_log = (step, now)
      img_per_s = steps_per_s * self.cfg.train.batch_size
      values.update(img_per_s=img_per_s, img_per_s_per_device=img_per_s / jax.device_count(),
                    tflops_per_device=steps_per_s * self.flops_per_step / 1e12,
                    samples_skipped=self._skipped)  # corrupt / unusable samples so far (this process)
      self.writer.write_scalars(step, values)
    return values["loss"]


def step_flops(compiled) -> float:
  """FLOPs of one step on one device, from XLA's cost analysis of the compiled (partitioned) program."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return 0.0
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


class PreviewSampler:
  """A sample grid of the EMA weights on a fixed set of examples (the first ones of the data), every N steps."""

  def __init__(self, trainer: Trainer):

    self.trainer = trainer
    cfg = trainer.cfg
    n = int(cfg.train.num_samples)
    with TrainInput(cfg.data.shards, kind=trainer.kind, image_size=trainer.model.image_size, batch_size=n,
                    tokenize=trainer.model.tokenize, num_neighbors=cfg.model.num_neighbors, seed=cfg.train.seed,
                    shuffle_buffer=1, prefetch=0) as first:
      self.batch = next(first)
    self.demos = None
    if trainer.kind == "icl":
      self.demos = {"images": self.batch["neighbor_images"], "ids": self.batch["neighbor_ids"],
                    "text_mask": self.batch["neighbor_text_mask"], "neighbor_mask": self.batch["neighbor_mask"]}
    model = nnx.merge(trainer.graphdef, trainer.state.params, trainer.state.frozen)
    self.graphdef, _ = nnx.split(model)
    self.fn = make_sample_fn(self.graphdef, trainer.schedule, cfg.sample, cfg.diffusion.prediction,
                             trainer.model.noise_shape)

  def write(self, step: int) -> str:

    t = self.trainer
    weights = t.state.ema if t.state.ema is not None else t.state.params
    _, state = nnx.split(nnx.merge(t.graphdef, weights, t.state.frozen))
    images = np.asarray(self.fn(state, jnp.asarray(self.batch["ids"]), jnp.asarray(self.batch["text_mask"]),
                                self.demos, jax.random.key(t.cfg.train.seed)))
    path = sample_grid_path(t.workdir, step)
    if t.primary:
      demos = None if self.demos is None else self.demos["images"]
      mask = None if self.demos is None else self.demos["neighbor_mask"]
      captions = [str(k) for k in self.batch["texts"]]
      save_sample_grid(path, images, demos, demo_mask=mask, captions=captions)
      t.writer.write_image(step, "samples", sample_grid(images, demos, demo_mask=mask))
    return path


def warn_truncated_captions(text_mask: np.ndarray, max_length: int, limit: float = 0.05) -> float:
  """Warns when more than `limit` of a batch's captions fill every token position (so were most likely cut at
  text.max_length: a byte-level tokenizer at 32 once cut the toy captions before the context they name last,
  and the model learned to ignore text). Returns the fraction."""
  mask = np.asarray(text_mask)
  fraction = float(mask[..., -1].mean()) if mask.size else 0.0
  if fraction > limit:
    log(f"warning: {fraction:.0%} of the first batch's captions fill all text.max_length={max_length} tokens and "
        "were probably cut; raise text.max_length if they carry meaning at the end")
  return fraction


def log(message: str) -> None:
  who = f" [process {jax.process_index()}/{jax.process_count()}]" if jax.process_count() > 1 else ""
  print(f"suti train{who}: {message}", file=sys.stderr, flush=True)


def train(cfg: mlc.ConfigDict, workdir: str, *, max_steps: int | None = None,
          progress: bool | None = None) -> TrainResult:
  if "://" in workdir:  # metrics.jsonl is appended line by line: object stores cannot append
    raise ValueError(f"--workdir must be a filesystem path, got '{workdir}': mount the bucket (gcsfuse "
                     "--implicit-dirs BUCKET /mnt/BUCKET) or use a shared filesystem (see launch/README.md)")
  os.makedirs(workdir, exist_ok=True)
  return Trainer(cfg, workdir, progress=progress).run(max_steps)
