"""`suti data calibrate-targets`: score distributions of expert targets, to set the target filter's thresholds.

The targets stage stores, per cluster, `<output>/work/targets/<cluster_id>.json`: every candidate's scores
(suti.experts.target_filter.CandidateScores) and its decision, plus reference scores from the cluster's real
images (reference_scores): what a perfect identity reaches (clip_i_real), what a wrong identity reaches
(clip_i_other) and what an image reaches with its own caption (clip_t_real). This command reads those files
and prints percentiles, the keep rate of the current thresholds (recomputed with decide(), so a config
change shows its effect without rerunning the experts) and suggested thresholds with the keep rate they give.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from suti.core.image_ops import resize_and_crop
from suti.embed import clip as clip_lib
from suti.experts.target_filter import REASONS, CandidateScores, TargetFilterConfig, decide, failing_reasons
from suti.formats.cluster_shards import ClusterRecord

PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
TARGETS_DIR = os.path.join("work", "targets")
# A faithful render of a new prompt scores CLIP-T below a real image with its own caption, because the prompt
# names the subject only by class. Toy CLIP, 200 train subjects: median 0.264 with the class-only prompt of the
# image's own context vs 0.328 with the full caption (0.80 of it), 0.099 with another context's prompt (0.30).
CLIP_T_FRACTION = 0.6
CLIP_T_PERCENTILE = 50


def targets_dir(output_dir: str) -> str:
  return os.path.join(output_dir, TARGETS_DIR)


def _round(values) -> list[float]:
  return [round(float(v), 4) for v in values]


def reference_scores(clip_model, tokenizer: Callable, record: ClusterRecord, other: ClusterRecord | None,
                     batch_size: int = 256, render_size: int | None = None) -> dict[str, list[float]]:
  """Reference CLIP scores of one cluster's real images:
  clip_i_real: each image's mean cosine to the cluster's other images (empty for a single image);
  clip_i_other: each image's mean cosine to the images of `other`, another cluster (empty without one);
  with render_size, the image on the left of those cosines is first resized to the renders' size, so the
  references say what a perfect render at the model's resolution would score;
  clip_t_real: each image's cosine to its own caption (images with an empty caption left out)."""
  if not record.images:
    raise ValueError(f"cluster {record.cluster_id} has no images")
  emb = clip_lib.embed_images(clip_model, list(record.images), batch_size)
  # The real image as a perfect render would show it: at the model's resolution (candidates are scored at theirs).
  low = emb
  if render_size:
    low = clip_lib.embed_images(clip_model, [resize_and_crop(i, render_size) for i in record.images], batch_size)
  n = len(emb)
  sim = low @ emb.T
  clip_i_real = (sim.sum(1) - np.diag(sim)) / (n - 1) if n > 1 else []
  clip_i_other: list[float] = []
  if other is not None and other.images:
    other_emb = clip_lib.embed_images(clip_model, list(other.images), batch_size)
    clip_i_other = (low @ other_emb.T).mean(1)
  captioned = [i for i, c in enumerate(record.captions) if c.strip()]
  clip_t_real: list[float] = []
  if captioned:
    txt = clip_lib.encode_texts(clip_model, tokenizer, [record.captions[i] for i in captioned], batch_size)
    clip_t_real = np.einsum("nd,nd->n", emb[captioned], txt)
  return {"clip_i_real": _round(clip_i_real), "clip_i_other": _round(clip_i_other),
          "clip_t_real": _round(clip_t_real)}


@dataclass
class Calibration:
  """Every candidate of every cluster file, and the pooled reference scores."""
  scores: list[CandidateScores]
  skills: list[str]
  clip_i_real: np.ndarray
  clip_i_other: np.ndarray
  clip_t_real: np.ndarray
  num_clusters: int

  def percentiles(self) -> dict[str, dict[str, float]]:
    def pct(values) -> dict[str, float]:
      values = np.asarray(values, np.float64)
      if values.size == 0:
        return {}
      return {f"p{p}": round(float(np.percentile(values, p)), 4) for p in PERCENTILES}
    return {"candidate_clip_i": pct([s.clip_i for s in self.scores]),
            "candidate_clip_t": pct([s.clip_t for s in self.scores]),
            "clip_i_real": pct(self.clip_i_real), "clip_i_other": pct(self.clip_i_other),
            "clip_t_real": pct(self.clip_t_real)}

  def keep_rate(self, cfg: TargetFilterConfig) -> float:
    """Fraction of candidates decide() keeps under `cfg` (0.0 without candidates)."""
    if not self.scores:
      return 0.0
    return sum(decide(s, cfg) is None for s in self.scores) / len(self.scores)

  def keep_rate_by_skill(self, cfg: TargetFilterConfig) -> dict[str, float]:
    kept, total = collections.Counter(), collections.Counter()
    for s, skill in zip(self.scores, self.skills):
      total[skill] += 1
      kept[skill] += decide(s, cfg) is None
    return {skill: round(kept[skill] / total[skill], 4) for skill in sorted(total)}

  def failing(self, cfg: TargetFilterConfig) -> dict[str, int]:
    """How many candidates fail each test (a candidate may fail several)."""
    counts = collections.Counter(r for s in self.scores for r in failing_reasons(s, cfg))
    return {reason: counts[reason] for reason in REASONS}

  def suggestions(self) -> dict[str, float]:
    """Suggested thresholds (only those the data supports):
    clip_i_threshold: midway between the clip_i_other p90 (what 10% of wrong identities still reach) and the
      clip_i_real p50 (what a typical real image of the subject reaches); needs clip_i_other references;
    clip_t_threshold: CLIP_T_FRACTION x the clip_t_real p{CLIP_T_PERCENTILE} (see CLIP_T_FRACTION: a
      class-only prompt scores below a full caption, a wrong scene far below).
    Values are rounded to 3 decimals. The blank and near-copy thresholds are not calibrated here."""
    out = {}
    if self.clip_i_other.size and self.clip_i_real.size:
      other_p90 = float(np.percentile(self.clip_i_other, 90))
      real_p50 = float(np.percentile(self.clip_i_real, 50))
      out["clip_i_threshold"] = round((other_p90 + real_p50) / 2, 3)
    if self.clip_t_real.size:
      out["clip_t_threshold"] = round(CLIP_T_FRACTION * float(np.percentile(self.clip_t_real, CLIP_T_PERCENTILE)), 3)
    return out


def _read_file(path: str) -> tuple[list[CandidateScores], list[str], dict]:
  try:
    with open(path) as f:
      data = json.load(f)
    candidates = data["candidates"]
    scores = [CandidateScores.from_dict(c["scores"]) for c in candidates]
    skills = [str(c.get("skill", "")) for c in candidates]
    reference = data.get("reference") or {}
    refs = {k: [float(v) for v in reference.get(k, [])] for k in ("clip_i_real", "clip_i_other", "clip_t_real")}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"{path}: not a targets file ({type(e).__name__}: {e})") from None
  return scores, skills, refs


def calibrate_targets(output_dir: str) -> Calibration:
  """Reads every `<output>/work/targets/*.json`."""
  paths = sorted(glob.glob(os.path.join(targets_dir(output_dir), "*.json")))
  if not paths:
    raise ValueError(f"no targets files in {targets_dir(output_dir)}: run the pipeline's targets stage first "
                     "(suti data run with a config whose stages include 'targets')")
  scores, skills, refs = [], [], collections.defaultdict(list)
  for path in paths:
    s, k, r = _read_file(path)
    scores += s
    skills += k
    for name, values in r.items():
      refs[name] += values
  arr = lambda name: np.asarray(refs[name], np.float64)  # noqa: E731
  return Calibration(scores, skills, arr("clip_i_real"), arr("clip_i_other"), arr("clip_t_real"), len(paths))


def report(cal: Calibration, config) -> str:
  """A table of percentiles, the current thresholds with their keep rate, suggestions with theirs, then one
  JSON line."""
  current = TargetFilterConfig.from_config(config.targets.filter)
  suggested = cal.suggestions()
  suggested_cfg = dataclasses.replace(current, **suggested)
  pct = cal.percentiles()
  model = config.clip.model_name if "clip" in config else ""
  lines = [f"target scores, CLIP model {model}: {len(cal.scores)} candidates of {cal.num_clusters} clusters; "
           f"references: {cal.clip_i_real.size} clip_i_real, {cal.clip_i_other.size} clip_i_other, "
           f"{cal.clip_t_real.size} clip_t_real",
           " " * 17 + " ".join(f"{f'p{p}':>7}" for p in PERCENTILES)]
  for name, row in pct.items():
    lines.append(f"{name:<16} " + " ".join(f"{row.get(f'p{p}', float('nan')):>7.3f}" for p in PERCENTILES))
  current_rate, suggested_rate = cal.keep_rate(current), cal.keep_rate(suggested_cfg)
  failing = cal.failing(current)
  lines.append("current:   " + ", ".join(f"targets.filter.{k}={v}" for k, v in current.to_dict().items()))
  lines.append(f"           keep rate {current_rate:.3f}; failing (a candidate may fail several): "
               + ", ".join(f"{k} {v}" for k, v in failing.items()))
  lines.append("suggested: " + (", ".join(f"--config.targets.filter.{k}={v}" for k, v in suggested.items())
                                or "none (no reference scores)"))
  lines.append(f"           keep rate {suggested_rate:.3f} (SuTI kept 20-30% of its experts' outputs)")
  lines.append(json.dumps({
      "model": model, "clusters": cal.num_clusters, "candidates": len(cal.scores), "percentiles": pct,
      "current": current.to_dict(), "current_keep_rate": round(current_rate, 4), "failing": failing,
      "keep_rate_by_skill": cal.keep_rate_by_skill(current),
      "suggested": suggested, "suggested_keep_rate": round(suggested_rate, 4)}))
  return "\n".join(lines)
