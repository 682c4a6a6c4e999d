"""Pipeline stages `experts` and `targets`: DreamBooth experts per cluster, their renders, the ICL shards.

experts (one task per cluster, accelerator): fine-tunes the base model (`experts.base_checkpoint`, a `suti train`
  workdir) on the cluster's images with the identifier token (or the class noun, experts.bind), each image's
  caption as its prompt with experts.caption_prompts, and class-prior preservation; it stores the expert
  under `<output>/experts/<cluster_id>/`: `expert.safetensors` (LoRA arrays only, or every UNet weight for
  method=full) and `expert.json` (settings, loss, time, size). Class-prior images are rendered once per class
  noun by the base model and kept in `<output>/work/class_images/`. An expert already on disk is reused, so a
  killed run resumes per cluster even inside a task.
targets (one task per bucket, accelerator): each expert renders its cluster's prompts with
  `targets.seeds_per_prompt` seeds; every render is scored (CLIP-I to the cluster's real images, CLIP-T to the
  prompt without the identifier token, blank and near-copy heuristics) and kept or dropped by
  `targets.filter`; kept renders become ICL examples (K real neighbors + target + prompt + meta) in
  `<output>/icl/icl-NNNNNN.tar`, or `<output>/icl/val/` for the validation clusters. Renders and scores are
  cached per cluster in `<output>/work/targets/` (what `suti data calibrate-targets` reads), so changing only
  `targets.filter` re-filters without rendering or retraining.
"""
from __future__ import annotations

import io
import json
import os
import time

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from data_pipeline.calibrate_targets import reference_scores, targets_dir
from data_pipeline.stages import Stage, StageContext, Task
from data_pipeline.stats import TaskResult, filter_counts
from suti.checkpoint.store import checkpoint_config, load_params
from suti.core import atomic_io
from suti.core.hashing import file_sha256, stable_seed
from suti.core.paths import resolve_path
from suti.embed.clip import load_clip_from_config
from suti.experts.dreambooth import ExpertTrainer, TrainedExpert, expert_token, prepare_images, render_prompt
from suti.experts.target_filter import (
  CandidateScores,
  FilterTally,
  TargetFilterConfig,
  clip_prompt,
  decide,
  score_candidates,
)
from suti.formats import cluster_shards, icl_shards
from suti.infer.sampler import Sampler

EXPERTS_DIR = "experts"
WEIGHTS_FILE, EXPERT_JSON = "expert.safetensors", "expert.json"
CLASS_IMAGES_DIR = os.path.join("work", "class_images")


def expert_dir(output_dir: str, cluster_id: str) -> str:
  return os.path.join(output_dir, EXPERTS_DIR, cluster_id)


def find_cluster(path: str, cluster_id: str) -> cluster_shards.ClusterRecord:
  for record in cluster_shards.read_cluster_shard(path):
    if record.cluster_id == cluster_id:
      return record
  raise ValueError(f"cluster {cluster_id} is not in {path}")


# ---- the base model, loaded once per worker process ---------------------------------------------------------------

class ExpertRuntime:
  """The base checkpoint, the expert trainer and the renderer of one worker (compiled once, reused per cluster)."""

  def __init__(self, config):
    path = resolve_path(config.experts.base_checkpoint)
    if not path or not os.path.isdir(path):
      raise ValueError(f"experts.base_checkpoint {config.experts.base_checkpoint!r} is not a folder: train a base "
                       "model (suti train --config configs/toy.py --workdir DIR ...) and set "
                       "--config.experts.base_checkpoint=DIR")
    weights, meta = load_params(path)
    self.base_cfg = checkpoint_config(meta, f"experts.base_checkpoint {path}")
    self.trainer = ExpertTrainer(self.base_cfg, weights, config.experts)
    t = config.targets
    self.renderer = Sampler.for_config(self.base_cfg, batch_size=int(t.render_batch_size),
                             sample_overrides={"steps": int(t.steps), "text_scale": float(t.text_scale)})


def runtime(ctx: StageContext) -> ExpertRuntime:
  return ctx.resource("expert_runtime", lambda: ExpertRuntime(ctx.config))


def class_images(ctx: StageContext, noun: str) -> np.ndarray | None:
  """The base model's renders of the class prompt (float32 [N, S, S, 3] in [-1, 1]), cached on disk per noun."""
  e = ctx.config.experts
  n = int(e.num_class_images)
  if n == 0 or float(e.prior_weight) == 0:
    return None
  rt = runtime(ctx)

  def render() -> np.ndarray:
    path = os.path.join(ctx.layout.output_dir, CLASS_IMAGES_DIR, f"{stable_seed(noun):08x}.npz")
    if os.path.isfile(path):
      with np.load(path) as f:
        if str(f["noun"]) == noun and len(f["images"]) == n:
          return f["images"]
    prompt = e.class_prompt.format(noun=noun)
    images = rt.renderer.render(rt.trainer.base_weights, [prompt] * n, stable_seed("class", noun, e.seed))
    buf = io.BytesIO()
    np.savez(buf, images=images, noun=np.array(noun))
    atomic_io.atomic_write_bytes(path, buf.getvalue())
    return images

  return ctx.resource(f"class_images:{noun}", lambda: prepare_images(list(render()), rt.trainer.image_size))


# ---- experts --------------------------------------------------------------------------------------------------------

def save_expert(folder: str, expert, info: dict) -> int:
  """Writes expert.safetensors then expert.json (the json marks a complete expert); returns the weights' bytes."""
  # One metadata key: safetensors writes a metadata dict in hash-map order, and the bytes must be reproducible
  # (the render cache is keyed by the file's hash).
  data = save({k: np.ascontiguousarray(v) for k, v in expert.weights.items()},
              metadata={"expert": json.dumps({"method": expert.method, "lora_alpha": expert.lora_alpha},
                                             sort_keys=True)})
  atomic_io.atomic_write_bytes(os.path.join(folder, WEIGHTS_FILE), data)
  atomic_io.atomic_write_json(os.path.join(folder, EXPERT_JSON), {**info, "weights_bytes": len(data)})
  return len(data)


def load_expert(folder: str):
  """(TrainedExpert, info) of a stored expert; ValueError when it is missing or incomplete."""
  info_path, weights_path = os.path.join(folder, EXPERT_JSON), os.path.join(folder, WEIGHTS_FILE)
  if not (os.path.isfile(info_path) and os.path.isfile(weights_path)):
    raise ValueError(f"no complete expert in {folder}")
  info = atomic_io.read_json(info_path)
  with safe_open(weights_path, framework="numpy") as f:
    meta = json.loads((f.metadata() or {}).get("expert", "{}"))
    weights = {k: f.get_tensor(k) for k in f.keys()}
  return TrainedExpert(meta.get("method", info["method"]), weights, float(meta.get("lora_alpha", 0.0))), info


def run_experts(ctx: StageContext, task: Task) -> TaskResult:
  result = TaskResult()
  counts = result.stage("experts")
  counts.in_ = 1
  record = find_cluster(task.bucket_input, task.cluster_id)
  if not record.prompts:
    counts.drop("no_prompts")
    return result
  folder = expert_dir(ctx.layout.output_dir, record.cluster_id)
  e = ctx.config.experts
  if os.path.isfile(os.path.join(folder, EXPERT_JSON)):
    info = dict(atomic_io.read_json(os.path.join(folder, EXPERT_JSON)))
  else:
    rt = runtime(ctx)
    noun = record.meta.get("class_noun") or "object"
    prompt_token = record.meta.get("subject_token", ctx.config.captions.token)
    token = expert_token(e, prompt_token)
    seed = stable_seed(record.cluster_id, e.seed)
    captions = list(record.captions) if e.get("caption_prompts", False) else None
    expert = rt.trainer.train(record.images, noun, token, class_images=class_images(ctx, noun), seed=seed,
                              captions=captions)
    tail = expert.losses[-max(1, len(expert.losses) // 10):]
    info = {"cluster_id": record.cluster_id, "expert_id": f"{e.method}-{record.cluster_id}", "method": e.method,
            "class_noun": noun, "token": token, "prompt_token": prompt_token, "caption_prompts": bool(captions),
            "instance_prompt": " ".join(e.instance_prompt.format(token=token, noun=noun).split()),
            "steps": int(e.steps), "lr": float(e.lr), "seed": seed, "num_images": len(record.images),
            "loss_first": round(expert.losses[0], 5), "loss_last": round(float(np.mean(tail)), 5),
            "train_seconds": round(expert.seconds, 3), "num_params": expert.num_params,
            "adapted_layers": rt.trainer.adapted_layers}
    info["weights_bytes"] = save_expert(folder, expert, info)
  counts.out = 1
  result.counters["expert_weight_bytes"] += int(info["weights_bytes"])
  result.counters["expert_train_ms"] += int(round(1000 * info["train_seconds"]))
  return result


def experts_failed(task: Task, error: str) -> TaskResult:
  result = TaskResult()
  counts = result.stage("experts")
  counts.in_ = 1
  counts.drop("expert_failed")
  return result


# ---- targets --------------------------------------------------------------------------------------------------------

def _render_key(ctx: StageContext, record, weights_path: str) -> dict:
  """What the cached renders of a cluster depend on (not the filter thresholds)."""
  weights_sha = file_sha256(weights_path)
  t = ctx.config.targets
  return {"expert_sha256": weights_sha, "prompts": record.prompts, "seeds_per_prompt": int(t.seeds_per_prompt),
          "steps": int(t.steps), "text_scale": float(t.text_scale), "seed": int(t.seed)}


def _clip(ctx: StageContext):
  return ctx.resource("clip_with_tokenizer", lambda: load_clip_from_config(ctx.config))


def render_and_score(ctx: StageContext, record, other, folder: str) -> tuple[np.ndarray, dict]:
  """The cluster's candidate renders (uint8) and its cache record (candidates with scores, references); read from
  `<output>/work/targets/<cid>.json|.npz` when they were made with the same expert and render settings."""
  base = os.path.join(targets_dir(ctx.layout.output_dir), record.cluster_id)
  key = _render_key(ctx, record, os.path.join(folder, WEIGHTS_FILE))
  if os.path.isfile(base + ".json") and os.path.isfile(base + ".npz"):
    cached = atomic_io.read_json(base + ".json")
    if cached.get("render_key") == key:
      with np.load(base + ".npz") as f:
        return f["images"], dict(cached)
  rt = runtime(ctx)
  expert, info = load_expert(folder)
  t = ctx.config.targets
  jobs = [(p["prompt"], p["skill"], s) for p in record.prompts for s in range(int(t.seeds_per_prompt))]
  prompt_token = info.get("prompt_token", info.get("token", ctx.config.captions.token))
  start = time.perf_counter()  # the expert reads the prompts with its own token (none when it binds the class noun)
  images = rt.renderer.render(rt.trainer.merged_weights(expert),
                              [render_prompt(j[0], prompt_token, info.get("token", prompt_token)) for j in jobs],
                              stable_seed(record.cluster_id, "targets", t.seed))
  seconds = time.perf_counter() - start
  model, _, tokenizer = _clip(ctx)
  scores = score_candidates(model, tokenizer, list(images), [clip_prompt(j[0], prompt_token) for j in jobs],
                            list(record.images), int(ctx.config.clip.batch_size))
  cache = {"cluster_id": record.cluster_id, "expert_id": info["expert_id"], "render_key": key,
           "render_seconds": round(seconds, 3),
           "candidates": [{"prompt": p, "skill": k, "seed": s, "scores": sc.to_dict(), "decision": None}
                          for (p, k, s), sc in zip(jobs, scores)],
           "reference": reference_scores(model, tokenizer, record, other, int(ctx.config.clip.batch_size),
                                         render_size=int(images.shape[1]))}
  buf = io.BytesIO()
  np.savez(buf, images=images)
  atomic_io.atomic_write_bytes(base + ".npz", buf.getvalue())
  atomic_io.atomic_write_json(base + ".json", cache)
  return images, cache


def run_targets(ctx: StageContext, task: Task) -> TaskResult:
  result = TaskResult()
  out_dir = ctx.layout.output_dir
  paths = {False: icl_shards.icl_shard_path(out_dir, task.index), True: icl_shards.icl_shard_path(out_dir, task.index,
                                                                                                    True)}
  clusters_path = os.path.join(ctx.layout.stage_dir("clusters"), cluster_shards.shard_name(task.index))
  records = list(cluster_shards.read_cluster_shard(clusters_path)) if os.path.isfile(clusters_path) else []
  cfg = TargetFilterConfig.from_config(ctx.config.targets.filter)
  t = ctx.config.targets
  tally = FilterTally()
  examples: dict[bool, list] = {False: [], True: []}
  for i, record in enumerate(records):
    folder = expert_dir(out_dir, record.cluster_id)
    if not os.path.isfile(os.path.join(folder, EXPERT_JSON)):
      result.counters["targets_clusters_without_expert"] += 1
      continue
    other = records[(i + 1) % len(records)] if len(records) > 1 else None
    images, cache = render_and_score(ctx, record, other, folder)
    kept = []
    for image, candidate in zip(images, cache["candidates"]):
      decision = decide(CandidateScores.from_dict(candidate["scores"]), cfg)
      candidate["decision"] = decision
      tally.add(decision)
      if decision is None:
        kept.append((image, candidate["prompt"], candidate["skill"], candidate["seed"], candidate["scores"]))
    atomic_io.atomic_write_json(os.path.join(targets_dir(out_dir), record.cluster_id + ".json"), cache)
    validation = icl_shards.is_validation(record.cluster_id, float(t.val_percent))
    result.counters["icl_val_clusters" if validation else "icl_train_clusters"] += int(bool(kept))
    examples[validation].extend(icl_shards.examples_for_cluster(record, kept, cache["expert_id"],
                                                                int(t.max_neighbors)))
  for validation, path in paths.items():
    if examples[validation]:
      icl_shards.write_icl_shard(path, examples[validation])
    elif os.path.exists(path):
      os.remove(path)  # a re-filter that keeps nothing here must not leave the old shard behind
    result.counters["icl_val_examples" if validation else "icl_train_examples"] += len(examples[validation])
  result.counts["targets"] = filter_counts(tally.kept, tally.dropped)
  return result


EXPERTS_STAGE = Stage("experts", "clusters", "experts", EXPERTS_DIR, ("experts",), run_experts,
                      granularity="cluster", accelerator=True, on_failure=experts_failed,
                      description="one DreamBooth expert per cluster (full, LoRA or block-wise LoRA)")
TARGETS_STAGE = Stage("targets", "experts", "icl", "icl", ("targets",), run_targets, accelerator=True,
                      recompute_on=("targets.filter",),
                      description="expert renders of the new prompts, CLIP-filtered, as ICL shards")
