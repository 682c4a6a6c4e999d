"""Expert target filtering (CLIP-I, CLIP-T, blank, near copy), its tally, and the target calibration command."""
from __future__ import annotations

import collections
import json
import os

import ml_collections as mlc
import numpy as np
import pytest
from PIL import Image

from data_pipeline import calibrate_targets
from suti.toy import world as tw
from data_pipeline.cli import main as data_main
from suti.formats.cluster_shards import ClusterRecord
from suti.config import load_config
from suti.experts.target_filter import (REASONS, CandidateScores, FilterTally, TargetFilterConfig, clip_prompt,
                                        decide, failing_reasons, min_pixel_distance, score_candidates)
from suti.embed import clip as clip_lib
from data_pipeline.stats import filter_counts

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
SUBJECT = tw.Subject("ball", "red", "stripes", "white")
OTHER = tw.Subject("kite", "blue")


@pytest.fixture(scope="module")
def clip():
  """(model, tokenizer) of the shipped toy CLIP, loaded once."""
  model, _, tokenizer = clip_lib.load_clip_from_config(load_config(os.path.join(CONFIGS, "pipeline", "toy.py")))
  return model, tokenizer


def render(subject: tw.Subject, background: str, variant: int = 0, size: int = 32) -> np.ndarray:
  return tw.render(subject, tw.Context(background=background, variant=variant), size)


@pytest.fixture(scope="module")
def references() -> list[np.ndarray]:
  return [render(SUBJECT, bg, i) for i, bg in enumerate(("grass", "room", "city"))]


def filter_section(**values) -> mlc.ConfigDict:
  base = {"clip_i_threshold": 0.8, "clip_t_threshold": 0.2, "blank_std_threshold": 2.0,
          "near_copy_clip_threshold": 0.99, "near_copy_pixel_threshold": 1.0}
  return mlc.ConfigDict({**base, **values})


# ----------------------------------------------------------------------------------------------
# Config and prompts.

def test_config_reads_exactly_its_keys():
  cfg = TargetFilterConfig.from_config(filter_section(clip_i_threshold=0.75))
  assert cfg.clip_i_threshold == 0.75 and cfg.near_copy_pixel_threshold == 1.0
  section = filter_section()
  del section["blank_std_threshold"]
  with pytest.raises(ValueError, match="missing keys \\['blank_std_threshold'\\]"):
    TargetFilterConfig.from_config(section)
  with pytest.raises(ValueError, match="unknown keys \\['clip_threshold'\\]"):
    TargetFilterConfig.from_config(filter_section(clip_threshold=0.3))
  with pytest.raises(ValueError, match="must be a number"):
    TargetFilterConfig.from_config(filter_section(clip_t_threshold="high"))


def test_clip_prompt_removes_the_whole_word_token_only():
  assert clip_prompt("a sks ball on the beach", "sks") == "a ball on the beach"
  assert clip_prompt("  sks   kite,  in the snow ", "sks") == "kite, in the snow"
  assert clip_prompt("a sks, sks box", "sks") == "a , box"
  assert clip_prompt("tasks and asks: sksx skss", "sks") == "tasks and asks: sksx skss"
  assert clip_prompt("a ball", "") == "a ball"


# ----------------------------------------------------------------------------------------------
# Scores.

def test_scores_match_their_definitions(clip, references):
  model, tokenizer = clip
  candidates = [render(SUBJECT, "beach"), render(OTHER, "beach"), render(SUBJECT, "snow", size=16)]
  prompts = ["a ball on the beach", "a kite on the beach", "a ball in the snow"]
  scores = score_candidates(model, tokenizer, candidates, prompts, references, batch_size=2)
  ref = clip_lib.encode_images(model, np.stack(references))
  for image, prompt, s in zip(candidates, prompts, scores):
    emb = clip_lib.encode_images(model, image[None])[0]
    txt = clip_lib.encode_texts(model, tokenizer, [prompt])[0]
    np.testing.assert_allclose([s.clip_i, s.clip_i_max, s.clip_t], [(ref @ emb).mean(), (ref @ emb).max(), txt @ emb],
                               atol=1e-5)
    assert s.pixel_std == pytest.approx(float(image.std()))
    assert s.min_pixel_distance > 0
  assert scores[0].to_dict() == {k: round(v, 4) for k, v in scores[0].__dict__.items()}
  assert CandidateScores.from_dict(scores[0].to_dict()) == CandidateScores(**scores[0].to_dict())


def test_same_subject_in_a_new_context_beats_another_subject(clip, references):
  model, tokenizer = clip
  same, other = score_candidates(model, tokenizer, [render(SUBJECT, "beach"), render(OTHER, "beach")],
                                 ["a ball on the beach"] * 2, references)
  assert same.clip_i > other.clip_i + 0.2
  ball_beach, kite_snow = score_candidates(
      model, tokenizer, [render(SUBJECT, "beach"), render(OTHER, "snow")],
      [clip_prompt("a sks ball on the beach", "sks")] * 2, references)
  assert ball_beach.clip_t > kite_snow.clip_t + 0.05


def test_pixel_distance_resizes_the_reference_to_the_candidate():
  big = render(SUBJECT, "grass", size=64)
  small = np.asarray(Image.fromarray(big).resize((32, 32), Image.Resampling.BICUBIC))
  assert min_pixel_distance(small, [render(OTHER, "snow"), big]) == 0.0
  shifted = np.clip(small.astype(int) + 3, 0, 255).astype(np.uint8)
  expected = np.abs(shifted.astype(int) - small.astype(int)).mean()
  assert min_pixel_distance(shifted, [big]) == pytest.approx(expected)


def test_bad_scoring_input_is_one_clear_error(clip, references):
  model, tokenizer = clip
  with pytest.raises(ValueError, match="2 candidate images but 1 prompts"):
    score_candidates(model, tokenizer, [references[0]] * 2, ["a"], references)
  with pytest.raises(ValueError, match="at least one reference"):
    score_candidates(model, tokenizer, [references[0]], ["a"], [])
  with pytest.raises(ValueError, match="candidate 0 must be a uint8"):
    score_candidates(model, tokenizer, [references[0].astype(np.float32)], ["a"], references)
  assert score_candidates(model, tokenizer, [], [], references) == []


# ----------------------------------------------------------------------------------------------
# Decisions.

def test_each_reason_comes_from_an_image_built_for_it(clip, references):
  model, tokenizer = clip
  cases = {  # name -> (image, prompt)
      "good": (render(SUBJECT, "beach", 7), "a ball on the beach"),
      "blank": (np.full((32, 32, 3), 128, np.uint8), "a ball on the beach"),
      "near_copy": (references[1].copy(), "a ball in a room"),
      "clip_i_low": (render(OTHER, "beach"), "a kite on the beach"),
      "clip_t_low": (render(SUBJECT, "beach", 7), "a kite in the snow"),
  }
  names = list(cases)
  scores = dict(zip(names, score_candidates(model, tokenizer, [cases[n][0] for n in names],
                                            [cases[n][1] for n in names], references)))
  good = scores["good"]
  cfg = TargetFilterConfig(
      clip_i_threshold=(good.clip_i + scores["clip_i_low"].clip_i) / 2,
      clip_t_threshold=(good.clip_t + scores["clip_t_low"].clip_t) / 2,
      blank_std_threshold=2.0, near_copy_clip_threshold=(good.clip_i_max + 1.0) / 2,
      near_copy_pixel_threshold=1.0)
  tally = FilterTally()
  for name, s in scores.items():
    decision = decide(s, cfg)
    assert decision == (None if name == "good" else name), name
    tally.add(decision)
  # Order: the constant image fails CLIP-I too, but "blank" is checked first; a copy passes CLIP-I and CLIP-T.
  assert failing_reasons(scores["blank"], cfg)[0] == "blank" and len(failing_reasons(scores["blank"], cfg)) > 1
  assert failing_reasons(scores["near_copy"], cfg) == ["near_copy"]
  # The pixel test alone catches a copy when the CLIP near-copy threshold cannot be reached.
  assert decide(scores["near_copy"], TargetFilterConfig(**{**cfg.to_dict(), "near_copy_clip_threshold": 1.5})) \
      == "near_copy"
  counts = filter_counts(tally.kept, tally.dropped)
  assert (counts.in_, counts.out, dict(counts.dropped)) == (5, 1, {r: 1 for r in REASONS})
  assert counts.in_ == counts.out + sum(counts.dropped.values())
  assert tally.keep_rate == pytest.approx(0.2)


def test_decide_at_the_thresholds():
  cfg = TargetFilterConfig(0.8, 0.2, 2.0, 0.99, 1.0)
  ok = CandidateScores(clip_i=0.8, clip_i_max=0.9899, clip_t=0.2, pixel_std=2.0, min_pixel_distance=1.0001)
  assert decide(ok, cfg) is None  # every threshold is a pass at exactly its value but the near-copy ones
  assert decide(CandidateScores(0.8, 0.99, 0.2, 2.0, 5.0), cfg) == "near_copy"
  assert decide(CandidateScores(0.8, 0.5, 0.2, 2.0, 1.0), cfg) == "near_copy"
  everything = CandidateScores(0.1, 1.0, 0.0, 0.0, 0.0)
  assert failing_reasons(everything, cfg) == list(REASONS) and decide(everything, cfg) == "blank"


def test_tally_balances_and_refuses_unknown_decisions():
  tally, other = FilterTally(), FilterTally()
  for d in [None, "blank", None, "clip_t_low", "clip_t_low"]:
    tally.add(d)
  other.add("near_copy")
  tally.update(other)
  counts = filter_counts(tally.kept, tally.dropped)
  assert counts.to_dict() == {"in": 6, "out": 2, "dropped": {"blank": 1, "clip_t_low": 2, "near_copy": 1}}
  assert FilterTally().keep_rate == 0.0
  with pytest.raises(ValueError, match="unknown filter decision 'dark'"):
    tally.add("dark")


# ----------------------------------------------------------------------------------------------
# Calibration.

def test_reference_scores(clip):
  model, tokenizer = clip
  images = [render(SUBJECT, bg, i) for i, bg in enumerate(("grass", "room", "city"))]
  captions = ["a red ball with white stripes on the grass", "", "a red ball with white stripes in the city"]
  record = ClusterRecord("c1", "https://shop/a", images, captions, ["k0", "k1", "k2"])
  other = ClusterRecord("c2", "https://shop/b", [render(OTHER, "sky"), render(OTHER, "night")], ["x", "y"],
                        ["k3", "k4"])
  ref = calibrate_targets.reference_scores(model, tokenizer, record, other)
  emb = clip_lib.encode_images(model, np.stack(images))
  sim = emb @ emb.T
  np.testing.assert_allclose(ref["clip_i_real"], [(sim[i].sum() - sim[i, i]) / 2 for i in range(3)], atol=2e-4)
  assert len(ref["clip_i_other"]) == 3 and max(ref["clip_i_other"]) < min(ref["clip_i_real"]) - 0.2
  assert len(ref["clip_t_real"]) == 2  # the empty caption is left out
  assert calibrate_targets.reference_scores(model, tokenizer, record, None)["clip_i_other"] == []


def write_targets(output: str, cluster_id: str, candidates: list[dict], reference: dict) -> None:
  folder = calibrate_targets.targets_dir(output)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, f"{cluster_id}.json"), "w") as f:
    json.dump({"cluster_id": cluster_id, "expert_id": f"expert-{cluster_id}", "candidates": candidates,
               "reference": reference}, f)


def synthetic_run(output: str) -> list[CandidateScores]:
  """Two cluster files of random scores whose stored decisions are all wrong (null)."""
  rng = np.random.default_rng(0)
  all_scores = []
  for c in range(2):
    candidates = []
    for i in range(40):
      s = CandidateScores(clip_i=rng.uniform(0.5, 1.0), clip_i_max=rng.uniform(0.8, 1.0),
                          clip_t=rng.uniform(0.0, 0.35), pixel_std=rng.uniform(0, 60),
                          min_pixel_distance=rng.uniform(0, 40))
      candidates.append({"prompt": f"p{i}", "skill": ("style", "property")[i % 2], "seed": i,
                         "scores": s.to_dict(), "decision": None})
      all_scores.append(CandidateScores(**s.to_dict()))
    reference = {"clip_i_real": list(rng.uniform(0.85, 0.97, 5)), "clip_i_other": list(rng.uniform(0.4, 0.8, 5)),
                 "clip_t_real": list(rng.uniform(0.25, 0.35, 5))}
    write_targets(output, f"c{c}", candidates, reference)
  return all_scores


def direct_keep_count(scores: list[CandidateScores], t: dict) -> int:
  return sum(s.pixel_std >= t["blank_std_threshold"] and s.clip_i_max < t["near_copy_clip_threshold"]
             and s.min_pixel_distance > t["near_copy_pixel_threshold"] and s.clip_i >= t["clip_i_threshold"]
             and s.clip_t >= t["clip_t_threshold"] for s in scores)


def test_calibration_follows_its_rule(tmp_path):
  scores = synthetic_run(str(tmp_path))
  cal = calibrate_targets.calibrate_targets(str(tmp_path))
  refs = collections.defaultdict(list)
  for c in range(2):
    with open(tmp_path / "work" / "targets" / f"c{c}.json") as f:
      for k, v in json.load(f)["reference"].items():
        refs[k] += v
  suggested = cal.suggestions()
  assert suggested == {
      "clip_i_threshold": round((np.percentile(refs["clip_i_other"], 90) + np.percentile(refs["clip_i_real"], 50))
                                / 2, 3),
      "clip_t_threshold": round(calibrate_targets.CLIP_T_FRACTION * np.percentile(refs["clip_t_real"], 50), 3)}
  section = filter_section()
  current = TargetFilterConfig.from_config(section)
  assert cal.keep_rate(current) == direct_keep_count(scores, section.to_dict()) / 80
  config = mlc.ConfigDict({"clip": {"model_name": "toy-ViT-32"}, "targets": {"filter": section}})
  summary = json.loads(calibrate_targets.report(cal, config).splitlines()[-1])
  assert summary["candidates"] == 80 and summary["clusters"] == 2
  assert summary["current_keep_rate"] == round(direct_keep_count(scores, section.to_dict()) / 80, 4) > 0
  new = {**section.to_dict(), **suggested}
  assert summary["suggested_keep_rate"] == round(direct_keep_count(scores, new) / 80, 4)
  assert summary["failing"]["clip_t_low"] == sum(s.clip_t < 0.2 for s in scores)
  # Without other-cluster references there is no clip_i suggestion.
  cal.clip_i_other = np.zeros(0)
  assert set(cal.suggestions()) == {"clip_t_threshold"}


def test_calibrate_targets_command(tmp_path, capsys):
  synthetic_run(str(tmp_path / "out"))
  config_file = tmp_path / "cfg.py"
  config_file.write_text(
      "import ml_collections as mlc\n"
      "def get_config():\n"
      "  c = mlc.ConfigDict()\n"
      "  c.clip = mlc.ConfigDict({'model_name': 'toy-ViT-32'})\n"
      "  c.targets = mlc.ConfigDict({'filter': mlc.ConfigDict({'clip_i_threshold': 0.8, 'clip_t_threshold': 0.2,"
      " 'blank_std_threshold': 2.0, 'near_copy_clip_threshold': 0.99, 'near_copy_pixel_threshold': 1.0})})\n"
      "  return c\n")
  assert data_main(["calibrate-targets", "--config", str(config_file), "--output", str(tmp_path / "out"),
                    "--config.targets.filter.clip_i_threshold=0.6"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert "p50" in lines[1] and lines[2].startswith("candidate_clip_i")
  assert any(line.startswith("suggested: --config.targets.filter.clip_i_threshold=") for line in lines)
  summary = json.loads(lines[-1])
  assert summary["current"]["clip_i_threshold"] == 0.6 and summary["candidates"] == 80
  with pytest.raises(ValueError, match="run the pipeline's targets stage first"):
    data_main(["calibrate-targets", "--config", str(config_file), "--output", str(tmp_path / "empty")])
  write_targets(str(tmp_path / "bad"), "c0", [{"prompt": "p", "scores": {"clip_i": 1}}], {})
  with pytest.raises(ValueError, match="not a targets file"):
    calibrate_targets.calibrate_targets(str(tmp_path / "bad"))
