"""DreamBooth experts on the toy world: full fine-tuning vs LoRA vs block-wise LoRA. Ends with one JSON line.

  python benchmarks/experts.py --base /tmp/toy_base [--clusters 6] [--steps 200] [--web /tmp/toyweb]

For the first N clusters of a toy web (mined by the toy pipeline: URL clusters, CLIP filter, template prompts),
each method trains one expert per cluster with configs/pipeline/toy_icl.py's settings (its own learning rate:
LoRA moves fewer weights and needs a larger step), stores it as the pipeline does (safetensors), and renders the
cluster's prompts (2 seeds). Per method: seconds per expert (training only, after the one-off compile, which is
reported apart), stored bytes per expert, the CLIP-I of the renders to the cluster's real images, CLIP-T to the
prompt, and the keep rate of the config's target filter. The base model's renders of the same prompts are the
reference every expert should beat on CLIP-I. `--base` is a `suti train --config configs/toy.py` workdir.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import time

import numpy as np

import data_pipeline  # noqa: F401  (torchvision shim)
from data_pipeline import stages
from suti.formats import cluster_shards
from data_pipeline.expert_stages import save_expert
from suti.core.hashing import stable_seed
from data_pipeline.runner_local import run_local
from suti.toy.web import write_toyweb
from suti.config import load_config
from suti.experts.dreambooth import ExpertTrainer, expert_token, prepare_images, render_prompt
from suti.infer.sampler import Sampler
from suti.experts.target_filter import FilterTally, TargetFilterConfig, clip_prompt, decide, score_candidates
from suti.checkpoint.store import checkpoint_config, load_params
from suti.embed.clip import load_clip_from_config
from suti.core.shards import list_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "pipeline", "toy_icl.py")
METHODS = {"full": 2e-4, "lora": 2e-3, "blockwise_lora": 2e-3}  # method -> learning rate


def mine_clusters(web: str, out: str, count: int) -> list[cluster_shards.ClusterRecord]:
  """The toy pipeline up to the captions stage; the first `count` clusters (bucket order)."""
  config = load_config(CONFIG, [("stages", "('cluster_map', 'cluster_reduce', 'clip_filter', 'captions')")])
  run_local(config, stages.RunLayout(tuple(list_shards(web)), out), workers=0, progress=False)
  records = []
  for path in sorted(glob.glob(os.path.join(out, "clusters", "clusters-*.tar"))):
    records.extend(r for r in cluster_shards.read_cluster_shard(path) if r.prompts)
  if len(records) < count:
    raise SystemExit(f"the toy web gave {len(records)} clusters with prompts, fewer than --clusters {count}")
  return records[:count]


def render_jobs(record, seeds: int) -> list[tuple[str, str]]:
  return [(p["prompt"], p["skill"]) for p in record.prompts for _ in range(seeds)]


def score(clip, record, images, jobs, token, filter_cfg) -> tuple[list, FilterTally]:
  model, _, tokenizer = clip
  scores = score_candidates(model, tokenizer, list(images), [clip_prompt(p, token) for p, _ in jobs],
                            list(record.images))
  tally = FilterTally()
  for s in scores:
    tally.add(decide(s, filter_cfg))
  return scores, tally


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--base", required=True, help="a toy base run's workdir (suti train --config configs/toy.py)")
  parser.add_argument("--web", default="", help="a toy web folder (default: a new 120-page toy web)")
  parser.add_argument("--clusters", type=int, default=6)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--seeds", type=int, default=2, help="renders per prompt")
  args = parser.parse_args()

  work = tempfile.mkdtemp(prefix="bench_experts_")
  web = args.web or os.path.join(work, "web")
  if not args.web:
    write_toyweb(web, 120, seed=0, image_size=32)
  records = mine_clusters(web, os.path.join(work, "pipeline"), args.clusters)
  config = load_config(CONFIG, [("experts.steps", str(args.steps))])
  weights, meta = load_params(args.base)
  base_cfg = checkpoint_config(meta, args.base)
  t = config.targets
  renderer = Sampler.for_config(base_cfg, batch_size=int(t.render_batch_size),
                      sample_overrides={"steps": int(t.steps), "text_scale": float(t.text_scale)})
  clip = load_clip_from_config(config)
  filter_cfg = TargetFilterConfig.from_config(t.filter)
  token = config.captions.token
  print(f"{len(records)} clusters ({sum(len(r.images) for r in records)} images), {args.steps} steps per expert, "
        f"{args.seeds} renders per prompt, base {args.base}")

  results = {}
  base_scores = []
  for name, lr in METHODS.items():
    experts_cfg = load_config(CONFIG, [("experts.method", name), ("experts.lr", str(lr)),
                                       ("experts.steps", str(args.steps))]).experts
    start = time.perf_counter()
    trainer = ExpertTrainer(base_cfg, weights, experts_cfg)
    build = time.perf_counter() - start
    bound = expert_token(experts_cfg, token)  # the rare token, or none when the experts bind the class noun
    if not base_scores:  # the base model's renders of the same prompts (token-free: it never saw it): the reference
      for record in records:
        jobs = render_jobs(record, args.seeds)
        images = renderer.render(trainer.base_weights, [render_prompt(p, token, "") for p, _ in jobs],
                                 stable_seed(record.cluster_id, "bench"))
        base_scores.extend(score(clip, record, images, jobs, token, filter_cfg)[0])
    class_cache: dict[str, np.ndarray] = {}
    seconds, sizes, scores, tally = [], [], [], FilterTally()
    compile_extra = 0.0
    for i, record in enumerate(records):
      noun = record.meta.get("class_noun", "object")
      if noun not in class_cache and float(experts_cfg.prior_weight) > 0:
        rendered = renderer.render(trainer.base_weights, [experts_cfg.class_prompt.format(noun=noun)] *
                                   int(experts_cfg.num_class_images), stable_seed("class", noun))
        class_cache[noun] = prepare_images(list(rendered), trainer.image_size)
      captions = list(record.captions) if experts_cfg.caption_prompts else None
      train_args = dict(class_images=class_cache.get(noun), seed=stable_seed(record.cluster_id), captions=captions)
      expert = trainer.train(record.images, noun, bound, **train_args)
      if i == 0:  # the first expert also compiles the step: time a second run of the same expert
        first = expert.seconds
        expert = trainer.train(record.images, noun, bound, **train_args)
        compile_extra = first - expert.seconds
      seconds.append(expert.seconds)
      sizes.append(save_expert(os.path.join(work, name, record.cluster_id), expert, {"method": name}))
      jobs = render_jobs(record, args.seeds)
      images = renderer.render(trainer.merged_weights(expert), [render_prompt(p, token, bound) for p, _ in jobs],
                               stable_seed(record.cluster_id, "bench"))
      s, tal = score(clip, record, images, jobs, token, filter_cfg)
      scores.extend(s)
      tally.update(tal)
    results[name] = {
        "lr": lr, "seconds_per_expert": round(float(np.median(seconds)), 2), "compile_seconds":
        round(build + compile_extra, 1), "bytes_per_expert": int(np.median(sizes)),
        "trained_params": int(expert.num_params), "clip_i": round(float(np.mean([x.clip_i for x in scores])), 4),
        "clip_t": round(float(np.mean([x.clip_t for x in scores])), 4), "keep_rate": round(tally.keep_rate, 4)}
  base = {"clip_i": round(float(np.mean([x.clip_i for x in base_scores])), 4),
          "clip_t": round(float(np.mean([x.clip_t for x in base_scores])), 4)}

  print(f"{'method':<16}{'s/expert':>10}{'compile s':>11}{'bytes':>12}{'params':>10}{'CLIP-I':>8}{'CLIP-T':>8}"
        f"{'keep':>7}")
  for name, r in results.items():
    print(f"{name:<16}{r['seconds_per_expert']:>10.2f}{r['compile_seconds']:>11.1f}{r['bytes_per_expert']:>12,}"
          f"{r['trained_params']:>10,}{r['clip_i']:>8.3f}{r['clip_t']:>8.3f}{r['keep_rate']:>7.1%}")
  print(f"{'base model':<16}{'':>10}{'':>11}{'':>12}{'':>10}{base['clip_i']:>8.3f}{base['clip_t']:>8.3f}")
  full = results["full"]["bytes_per_expert"]
  print(json.dumps({"clusters": len(records), "steps": args.steps, "methods": results, "base": base,
                    "storage_ratio_lora_vs_full": round(results["lora"]["bytes_per_expert"] / full, 4),
                    "storage_ratio_blockwise_vs_full": round(results["blockwise_lora"]["bytes_per_expert"] / full, 4),
                    "filter": filter_cfg.to_dict()}))


if __name__ == "__main__":
  main()
