"""Time per subject: SuTI few-shot vs DreamBooth (fine-tune + sample), and few-shot vs plain sampling. Ends with
one JSON line.

  python benchmarks/fewshot.py [--checkpoint checkpoints/toy_suti] [--base checkpoints/toy_base] [--subjects 3]
      [--prompts 4] [--expert-steps 1000] [--toy-expert-steps 200] [--separate-neighbor-scale 2.0]

Per held-out toy subject (3 demos, `--prompts` prompts, one image each, the apprentice's sampler and steps):
  suti        the apprentice samples the prompts with the demos (neighbor tokens once per call) with its own
              guidance (checkpoints/toy_suti: text scale = neighbor scale, two guided rows per step);
  suti_separate_scales
              the same with neighbor scale --separate-neighbor-scale (joint guidance with separate scales needs a
              third row per step, the text-only prediction);
  dreambooth  a DreamBooth expert is fine-tuned on the demos from the base model (the pipeline's expert code and
              settings, --expert-steps steps: 1000 is DreamBooth's published recipe) and samples the same prompts
              with the same sampler and steps;
  toy_expert  the same with --toy-expert-steps (200: the toy pipeline's experts and the eval's DreamBooth baseline);
  plain       the base model samples the same prompts text-to-image (two guided rows per step), through the same
              compiled sampler class as the apprentice.
Every program is compiled before timing (one warm-up subject); times are medians over subjects.
speedup_vs_dreambooth = dreambooth / suti (goal >= 50), speedup_vs_toy_expert = toy_expert / suti;
fewshot_vs_plain_ratio = suti / plain (goal <= 1.1), fewshot_vs_plain_ratio_separate_scales likewise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default="checkpoints/toy_suti")
  parser.add_argument("--base", default="checkpoints/toy_base")
  parser.add_argument("--subjects", type=int, default=3)
  parser.add_argument("--prompts", type=int, default=4)
  parser.add_argument("--expert-steps", type=int, default=1000, help="DreamBooth's fine-tuning steps")
  parser.add_argument("--toy-expert-steps", type=int, default=200, help="the toy pipeline's expert steps")
  parser.add_argument("--separate-neighbor-scale", type=float, default=2.0,
                      help="neighbor scale of the suti_separate_scales variant (differs from the text scale)")
  args = parser.parse_args()

  from configs.pipeline import toy_icl
  from suti.core.paths import resolve_path
  from suti.toy.web import write_toyweb
  from suti.eval.benchmark import read_benchmark
  from suti.experts.dreambooth import ExpertTrainer, expert_token, render_prompt
  from suti.infer.sampler import Sampler
  from suti.infer.load_model import load_model
  from suti.checkpoint.store import checkpoint_config, load_params

  web = tempfile.mkdtemp(prefix="bench_fewshot_")
  write_toyweb(web, 1, seed=3, benchmark_per_class=1)
  bench = read_benchmark(os.path.join(web, "benchmark"), max_subjects=args.subjects + 1, max_prompts=args.prompts)
  loaded = load_model(args.checkpoint, kind="apprentice")
  suti = Sampler.for_loaded(loaded, batch_size=args.prompts)
  s = suti.sample_cfg
  separate = Sampler.for_loaded(loaded, batch_size=args.prompts, sample_overrides={
      "guidance_mode": "joint", "neighbor_scale": args.separate_neighbor_scale})
  weights, meta = load_params(resolve_path(args.base))
  base_cfg = checkpoint_config(meta)
  shared = {k: s[k] for k in ("sampler", "steps", "text_scale", "dynamic_threshold", "guidance_mode")}
  renderer = Sampler.for_config(base_cfg, batch_size=args.prompts, sample_overrides=shared)
  plain = Sampler.for_loaded(load_model(args.base, kind="base"), batch_size=args.prompts, sample_overrides=shared)
  experts_cfg = toy_icl.get_config().experts
  with experts_cfg.unlocked():
    experts_cfg.prior_weight = 0.0  # class images are shared by every subject of a class: not per-subject cost
  trainers = {}
  for name, steps in (("dreambooth", args.expert_steps), ("toy_expert", args.toy_expert_steps)):
    cfg = experts_cfg.copy_and_resolve_references()
    cfg.steps = steps
    trainers[name] = ExpertTrainer(base_cfg, weights, cfg)

  times: dict[str, list[float]] = {k: [] for k in ("suti", "suti_separate_scales", "dreambooth", "toy_expert",
                                                   "plain")}
  for i, subject in enumerate(bench.subjects):
    demos = subject.images[:3]
    captions = [f"a photo of a {subject.cls}"] * len(demos)
    prompts = subject.prompts
    bound = expert_token(experts_cfg, subject.token)

    def timed(fn):
      start = time.perf_counter()
      fn()
      return time.perf_counter() - start

    def dreambooth(trainer):
      return renderer.render(trainer.merged_weights(trainer.train(demos, subject.cls, bound, seed=i)),
                             [render_prompt(p, subject.token, bound) for p in prompts], i)

    runs = {
        "suti": lambda: suti.sample(prompts, i, demos=[demos] * len(prompts), demo_captions=[captions] * len(prompts)),
        "suti_separate_scales": lambda: separate.sample(prompts, i, demos=[demos] * len(prompts),
                                                        demo_captions=[captions] * len(prompts)),
        "plain": lambda: plain.sample(prompts, i),
        "dreambooth": lambda: dreambooth(trainers["dreambooth"]),
        "toy_expert": lambda: dreambooth(trainers["toy_expert"]),
    }
    for name, run in runs.items():
      seconds = timed(run)
      if i > 0:  # subject 0 compiles every program
        times[name].append(seconds)
      print(f"subject {subject.name}: {name} {seconds:.2f} s" + (" (warm-up, compiles)" if i == 0 else ""))

  med = {k: float(np.median(v)) for k, v in times.items()}
  result = {"subjects": len(times["suti"]), "prompts_per_subject": args.prompts, "sampler": s.sampler,
            "steps": int(s.steps), "text_scale": float(s.text_scale), "neighbor_scale": float(s.neighbor_scale),
            "guidance_mode": s.guidance_mode, "expert_steps": args.expert_steps,
            "toy_expert_steps": args.toy_expert_steps,
            "seconds_per_subject": {k: round(v, 3) for k, v in med.items()},
            "speedup_vs_dreambooth": round(med["dreambooth"] / med["suti"], 1),
            "speedup_vs_toy_expert": round(med["toy_expert"] / med["suti"], 1),
            "fewshot_vs_plain_ratio": round(med["suti"] / med["plain"], 3),
            "fewshot_vs_plain_ratio_separate_scales": round(med["suti_separate_scales"] / med["plain"], 3)}
  print(f"per subject ({args.prompts} images): SuTI {med['suti']:.2f} s (separate scales "
        f"{med['suti_separate_scales']:.2f} s), DreamBooth {med['dreambooth']:.2f} s ({args.expert_steps} steps + "
        f"sampling), toy expert {med['toy_expert']:.2f} s ({args.toy_expert_steps} steps), plain text-to-image "
        f"{med['plain']:.2f} s")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
