"""The `experts` and `targets` stages end to end on a small toy web and a tiny base model trained by the trainer:
every filter decision counted, ICL shards read by the trainer's loader, resumption per cluster, re-filtering
without retraining or re-rendering, failures counted, LoRA experts stored small.

One main run (module fixture) is made once; tests that rerun work on copies of its output (shutil.copytree keeps
mtimes), so they do not depend on each other's order."""
import glob
import json
import os
import shutil

import numpy as np
import pytest

from data_pipeline import stages
from suti.formats import cluster_shards
from data_pipeline.runner_local import run_local
from suti.toy.web import write_toyweb
from suti.config import load_config
from suti.formats import icl_shards
from suti.experts.target_filter import REASONS, CandidateScores, TargetFilterConfig, decide
from suti.core.shards import list_shards
from suti.viz.contact_sheet import caption_band
from shared_fixtures import TINY_LATENT_OVERRIDES, write_tiny_checkpoint

pytestmark = pytest.mark.costly(seconds=115)  # cold seconds (--durations): costly files start first

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "pipeline", "toy_icl.py")
SEEDS_PER_PROMPT = 2
PROMPTS_PER_CLUSTER = 5  # one prompt per skill
# Toy web seed 1, 8 pages: 4 clusters over 2 buckets, one of them a validation cluster at val_percent 30.
SMALL = [("cluster.num_buckets", "2"), ("captions.prompts_per_skill", "1"), ("experts.steps", "3"),
         ("experts.num_class_images", "2"), ("experts.batch_size", "2"), ("targets.steps", "2"),
         ("targets.render_batch_size", "8"), ("targets.seeds_per_prompt", str(SEEDS_PER_PROMPT)),
         ("targets.max_neighbors", "3"), ("targets.val_percent", "30.0"),
         # the untrained toy experts score CLIP-I 0.3-0.85: this keeps some and drops some (clip_i_low)
         ("targets.filter.clip_i_threshold", "0.55"), ("targets.filter.clip_t_threshold", "-1.0"),
         ("runner.max_retries", "0")]
UP_TO_EXPERTS = ("stages", "('cluster_map', 'cluster_reduce', 'clip_filter', 'captions', 'experts')")


@pytest.fixture(scope="module")
def web(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("expert_web"))
  write_toyweb(out, pages=8, seed=1, image_size=32, benchmark_per_class=0)
  return out


@pytest.fixture(scope="module")
def base(tiny_base_run):
  return tiny_base_run  # the tests are about the pipeline: any trained tiny base will do


def make_config(base: str, overrides=()):
  return load_config(CONFIG, [("experts.base_checkpoint", base)] + SMALL + list(overrides))


def run(web: str, out: str, config) -> dict:
  return run_local(config, stages.RunLayout(tuple(list_shards(web)), out), workers=0, progress=False)


@pytest.fixture(scope="module")
def main_run(web, base, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("expert_run") / "out")
  config = make_config(base)
  return out, run(web, out, config), config


def copy_run(out: str, dest: str) -> str:
  shutil.copytree(out, dest)  # copy2: mtimes kept
  return dest


def cluster_ids(out: str) -> list[str]:
  return sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "experts", "*")))


def read_icl(out: str) -> dict[str, list[icl_shards.ICLExample]]:
  """Split -> examples in shard order."""
  return {split: [e for p in sorted(glob.glob(os.path.join(folder, "*.tar"))) for e in icl_shards.read_icl_shard(p)]
          for split, folder in (("train", os.path.join(out, "icl")), ("val", os.path.join(out, "icl", "val")))}


def icl_bytes(out: str) -> dict[str, bytes]:
  """Relative path -> bytes of every ICL shard (train and val)."""
  return {os.path.relpath(p, out): b for p, (_, b) in
          file_states(glob.glob(os.path.join(out, "icl", "**", "*.tar"), recursive=True)).items()}


def candidate_files(out: str) -> dict[str, dict]:
  files = sorted(glob.glob(os.path.join(out, "work", "targets", "*.json")))
  return {os.path.basename(p)[:-len(".json")]: json.load(open(p)) for p in files}


def file_states(paths) -> dict[str, tuple[int, bytes]]:
  """path -> (mtime_ns, bytes)."""
  states = {}
  for p in sorted(paths):
    with open(p, "rb") as f:
      states[p] = (os.stat(p).st_mtime_ns, f.read())
  return states


def expert_files(out: str) -> list[str]:
  return glob.glob(os.path.join(out, "experts", "*", "*"))


def recount(out: str, filter_cfg: TargetFilterConfig) -> tuple[int, dict[str, int]]:
  """(kept, dropped by reason) recomputed from the stored scores with decide()."""
  kept, dropped = 0, {}
  for cache in candidate_files(out).values():
    for c in cache["candidates"]:
      decision = decide(CandidateScores.from_dict(c["scores"]), filter_cfg)
      if decision is None:
        kept += 1
      else:
        dropped[decision] = dropped.get(decision, 0) + 1
  return kept, dropped


def assert_balanced(stats: dict) -> None:
  for name, c in stats["stages"].items():
    assert c["in"] == c["out"] + sum(c["dropped"].values()), name


# ---------------------------------------------------------------------------------------------- counts


def test_every_filter_decision_is_counted(main_run):
  out, stats, _ = main_run
  with open(os.path.join(out, "stats.json")) as f:
    assert json.load(f) == stats
  s, counters = stats["stages"], stats["counters"]
  assert list(s)[-2:] == ["experts", "targets"]
  assert_balanced(stats)
  clusters = stats["counters"]["clusters_out"]
  assert clusters == 4 and s["experts"]["in"] == clusters == s["experts"]["out"] + sum(s["experts"]["dropped"].values())
  with_expert = cluster_ids(out)
  assert len(with_expert) == s["experts"]["out"] == clusters
  assert all(os.path.isfile(os.path.join(out, "experts", cid, name))
             for cid in with_expert for name in ("expert.json", "expert.safetensors"))
  assert counters["expert_weight_bytes"] == sum(os.path.getsize(os.path.join(out, "experts", cid, "expert.safetensors"))
                                                for cid in with_expert)

  t = s["targets"]
  assert t["in"] == len(with_expert) * PROMPTS_PER_CLUSTER * SEEDS_PER_PROMPT == 40
  assert t["in"] == t["out"] + sum(t["dropped"].values())
  assert 0 < t["out"] < t["in"] and set(t["dropped"]) == {"clip_i_low"}  # the main run's filter: CLIP-I only
  written = read_icl(out)
  assert t["out"] == len(written["train"]) + len(written["val"])
  assert len(written["train"]) == counters["icl_train_examples"] and len(written["val"]) == counters["icl_val_examples"]
  assert counters["icl_val_clusters"] == 1 and counters["icl_train_clusters"] >= 1


def test_decision_files_hold_one_decision_per_candidate(main_run):
  out, stats, config = main_run
  files = candidate_files(out)
  assert sorted(files) == cluster_ids(out)
  filter_cfg = TargetFilterConfig.from_config(config.targets.filter)
  kept, dropped = 0, {}
  for cid, cache in files.items():
    assert cache["cluster_id"] == cid
    candidates = cache["candidates"]
    assert len(candidates) == PROMPTS_PER_CLUSTER * SEEDS_PER_PROMPT
    pairs = [(c["prompt"], c["seed"]) for c in candidates]
    assert len(set(pairs)) == len(pairs) and {c["seed"] for c in candidates} == set(range(SEEDS_PER_PROMPT))
    with np.load(os.path.join(out, "work", "targets", cid + ".npz")) as f:
      assert f["images"].shape == (len(candidates), 8, 8, 3) and f["images"].dtype == np.uint8
    for c in candidates:
      recomputed = decide(CandidateScores.from_dict(c["scores"]), filter_cfg)
      assert c["decision"] == recomputed and (recomputed is None or recomputed in REASONS)
      if recomputed is None:
        kept += 1
      else:
        dropped[recomputed] = dropped.get(recomputed, 0) + 1
  assert (kept, dropped) == (stats["stages"]["targets"]["out"], stats["stages"]["targets"]["dropped"])
  # `suti data calibrate-targets` reads the same files and finds the run's keep rate
  from data_pipeline.calibrate_targets import calibrate_targets
  cal = calibrate_targets(out)
  assert (cal.num_clusters, len(cal.scores)) == (len(files), stats["stages"]["targets"]["in"])
  assert cal.keep_rate(filter_cfg) == kept / stats["stages"]["targets"]["in"]
  # every kept candidate is one written example, with its prompt, seed and scores
  written = read_icl(out)
  images_per_cluster = {r.cluster_id: len(r.images) for p in glob.glob(os.path.join(out, "clusters", "*.tar"))
                        for r in cluster_shards.read_cluster_shard(p)}
  kept_by_cluster = {cid: [(c["prompt"], c["seed"], c["scores"]) for c in cache["candidates"] if c["decision"] is None]
                     for cid, cache in files.items()}
  for examples in written.values():
    for e in examples:
      cid, n = e.key.rsplit("_", 1)
      assert e.meta["cluster_id"] == cid
      assert (e.prompt, e.meta["seed"], e.meta["scores"]) == tuple(kept_by_cluster[cid][int(n)])
      assert e.target.shape == (8, 8, 3) and len(e.neighbors) == min(3, images_per_cluster[cid])


# ---------------------------------------------------------------------------------------------- the trainer reads it


def test_icl_shards_round_trip_through_the_trainers_loader(main_run):
  from suti.train.input_pipeline import TrainInput
  from shared_fixtures import byte_tokenizer
  byte_tokenize = byte_tokenizer(12)
  out, _, _ = main_run
  written = read_icl(out)
  train_keys = [e.key for e in written["train"]]
  val_keys = [e.key for e in written["val"]]
  assert train_keys and val_keys
  train_clusters = {k.rsplit("_", 1)[0] for k in train_keys}
  val_clusters = {k.rsplit("_", 1)[0] for k in val_keys}
  assert not train_clusters & val_clusters  # a cluster lands in one split
  assert all(icl_shards.is_validation(c, 30.0) for c in val_clusters)
  assert not any(icl_shards.is_validation(c, 30.0) for c in train_clusters)

  prompts = {e.key: e.prompt for e in written["train"]}
  seen = []
  # batch_size 1, no shuffle: the first len(train) batches are exactly epoch 0
  with TrainInput(os.path.join(out, "icl", "*.tar"), kind="icl", image_size=8, batch_size=1, tokenize=byte_tokenize,
                  num_neighbors=3, shuffle_buffer=0, prefetch=0) as stream:
    for _ in range(len(train_keys)):
      batch = next(stream)
      key = str(batch["keys"][0])
      seen.append(key)
      assert str(batch["texts"][0]) == prompts[key]
      assert batch["images"].shape == (1, 8, 8, 3) and batch["neighbor_images"].shape == (1, 3, 8, 8, 3)
      assert batch["neighbor_mask"].all()
  assert sorted(seen) == sorted(train_keys)  # the glob icl/*.tar reads the train split, every example once
  with TrainInput(os.path.join(out, "icl", "val", "*.tar"), kind="icl", image_size=8, batch_size=1,
                  tokenize=byte_tokenize, num_neighbors=3, shuffle_buffer=0, prefetch=0) as stream:
    assert sorted(str(next(stream)["keys"][0]) for _ in val_keys) == sorted(val_keys)


# ---------------------------------------------------------------------------------------------- resuming


def test_rerun_after_the_experts_stage_reuses_every_stored_expert(main_run, web, tmp_path):
  out, stats, config = main_run
  copy = copy_run(out, str(tmp_path / "resume"))
  experts_before = file_states(expert_files(copy))
  renders_before = file_states(glob.glob(os.path.join(copy, "work", "targets", "*.npz")))
  icl_before = icl_bytes(copy)
  with open(os.path.join(copy, "stats.json"), "rb") as f:
    stats_bytes = f.read()
  # Forget the experts stage and everything after it; keep <output>/experts/ (and the render cache in work/).
  for folder in ("_done/experts", "_done/targets", "icl"):
    shutil.rmtree(os.path.join(copy, folder))
  os.remove(os.path.join(copy, "stats.json"))

  again = run(web, copy, config)
  assert again == stats
  with open(os.path.join(copy, "stats.json"), "rb") as f:
    assert f.read() == stats_bytes
  assert file_states(expert_files(copy)) == experts_before  # bytes and mtimes: no expert retrained
  assert file_states(renders_before) == renders_before  # the same experts: nothing rendered again
  assert icl_bytes(copy) == icl_before

  # One expert lost, and the renders: only that expert is trained again, to the same arrays (an expert does not
  # depend on the others or on the order they were trained in); the renders and ICL shards come out the same.
  victim = cluster_ids(copy)[-1]
  weights_path = os.path.join(copy, "experts", victim, "expert.safetensors")
  renders = {}
  for path in renders_before:
    with np.load(path) as f:
      renders[path] = f["images"]
  shutil.rmtree(os.path.join(copy, "experts", victim))
  for folder in ("_done/experts", "_done/targets", "icl", "work/targets"):
    shutil.rmtree(os.path.join(copy, folder))
  retrained = run(web, copy, config)
  # Same arrays and metadata (not the same bytes: see test_save_expert_is_deterministic).
  assert_same_safetensors(read_safetensors(weights_path), read_safetensors(experts_before[weights_path][1]))

  def others(states):
    return {p: v for p, v in states.items() if f"{os.sep}{victim}{os.sep}" not in p}
  assert others(file_states(expert_files(copy))) == others(experts_before)
  assert retrained["stages"] == stats["stages"]
  assert {k: v for k, v in retrained["counters"].items() if k != "expert_train_ms"} == \
         {k: v for k, v in stats["counters"].items() if k != "expert_train_ms"}
  for path, images in renders.items():
    with np.load(path) as f:
      np.testing.assert_array_equal(f["images"], images)
  assert icl_bytes(copy) == icl_before


def test_refilter_changes_only_the_targets(main_run, web, tmp_path):
  out, stats, config = main_run
  copy = copy_run(out, str(tmp_path / "refilter"))
  untouched = file_states(expert_files(copy) + glob.glob(os.path.join(copy, "work", "targets", "*.npz")))
  base_filter = config.targets.filter.to_dict()

  # A higher CLIP-I threshold keeps fewer.
  higher = make_config(config.experts.base_checkpoint, [("targets.filter.clip_i_threshold", "0.7")])
  stricter = run(web, copy, higher)
  assert_balanced(stricter)
  kept, dropped = recount(copy, TargetFilterConfig.from_config(higher.targets.filter))
  t = stricter["stages"]["targets"]
  assert (t["out"], t["dropped"]) == (kept, dropped)
  assert t["in"] == stats["stages"]["targets"]["in"] and t["out"] < stats["stages"]["targets"]["out"]
  assert stricter["stages"]["experts"] == stats["stages"]["experts"]
  written = read_icl(copy)
  assert len(written["train"]) + len(written["val"]) == t["out"]
  assert file_states(expert_files(copy) + glob.glob(os.path.join(copy, "work", "targets", "*.npz"))) == untouched
  assert all(c["decision"] == decide(CandidateScores.from_dict(c["scores"]),
                                     TargetFilterConfig.from_config(higher.targets.filter))
             for cache in candidate_files(copy).values() for c in cache["candidates"])

  # Thresholds from the stored scores so that every reason is the first failing test of some candidates.
  scores = [CandidateScores.from_dict(c["scores"]) for cache in candidate_files(copy).values()
            for c in cache["candidates"]]
  thresholds = dict(base_filter, near_copy_clip_threshold=2.0)
  remaining = list(scores)
  for reason, field, key, below in (("blank", "pixel_std", "blank_std_threshold", True),
                                    ("near_copy", "min_pixel_distance", "near_copy_pixel_threshold", False),
                                    ("clip_i_low", "clip_i", "clip_i_threshold", True),
                                    ("clip_t_low", "clip_t", "clip_t_threshold", True)):
    values = sorted(getattr(s, field) for s in remaining)
    cut = len(values) // 5
    thresholds[key] = (values[cut - 1] + values[cut]) / 2 if below else values[cut - 1]  # < and <= in failing_reasons
    remaining = [s for s in remaining if (getattr(s, field) >= thresholds[key] if below
                                          else getattr(s, field) > thresholds[key])]
  every = make_config(config.experts.base_checkpoint, [(f"targets.filter.{k}", repr(float(v)))
                                                      for k, v in thresholds.items()])
  all_reasons = run(web, copy, every)
  assert_balanced(all_reasons)
  t = all_reasons["stages"]["targets"]
  kept, dropped = recount(copy, TargetFilterConfig.from_config(every.targets.filter))
  assert (t["out"], t["dropped"]) == (kept, dropped) and kept == len(remaining) > 0
  assert set(t["dropped"]) == set(REASONS)
  written = read_icl(copy)
  assert len(written["train"]) + len(written["val"]) == t["out"]
  assert all_reasons["counters"]["icl_train_examples"] + all_reasons["counters"]["icl_val_examples"] == t["out"]
  assert file_states(expert_files(copy) + glob.glob(os.path.join(copy, "work", "targets", "*.npz"))) == untouched

  # A filter that keeps nothing leaves no ICL shard behind (not even the earlier runs' ones).
  nothing = run(web, copy, make_config(config.experts.base_checkpoint, [("targets.filter.clip_i_threshold", "2.0")]))
  t = nothing["stages"]["targets"]
  assert (t["in"], t["out"], t["dropped"]) == (stats["stages"]["targets"]["in"], 0, {"clip_i_low": t["in"]})
  assert not glob.glob(os.path.join(copy, "icl", "**", "*.tar"), recursive=True)
  assert nothing["counters"]["icl_train_examples"] == nothing["counters"]["icl_val_examples"] == 0
  assert file_states(expert_files(copy) + glob.glob(os.path.join(copy, "work", "targets", "*.npz"))) == untouched


def read_safetensors(source) -> tuple[dict, dict[str, np.ndarray]]:
  """(metadata, arrays) of a safetensors file (path) or its bytes."""
  from safetensors import safe_open
  from safetensors.numpy import load
  if isinstance(source, bytes):
    header_len = int.from_bytes(source[:8], "little")
    return json.loads(source[8:8 + header_len]).get("__metadata__", {}), load(source)
  with safe_open(source, framework="numpy") as f:
    return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}


def assert_same_safetensors(a, b) -> None:
  assert a[0] == b[0] and sorted(a[1]) == sorted(b[1])
  for k in a[1]:
    assert a[1][k].dtype == b[1][k].dtype
    np.testing.assert_array_equal(a[1][k], b[1][k])


def test_save_expert_is_deterministic(tmp_path):
  from data_pipeline.expert_stages import save_expert
  from suti.experts.dreambooth import TrainedExpert
  expert = TrainedExpert("lora", {"unet/x/lora_a": np.arange(6, dtype=np.float32).reshape(2, 3),
                                  "unet/x/lora_b": np.zeros((3, 2), np.float32)}, 4.0)
  contents = set()
  for i in range(16):  # a random order of two keys differs between 16 saves but with probability 2**-15
    folder = str(tmp_path / str(i))
    save_expert(folder, expert, {"method": "lora"})
    with open(os.path.join(folder, "expert.safetensors"), "rb") as f:
      contents.add(f.read())
  assert len(contents) == 1
  from data_pipeline.expert_stages import load_expert
  loaded, info = load_expert(str(tmp_path / "0"))
  assert (loaded.method, loaded.lora_alpha, info["method"]) == ("lora", 4.0, "lora")
  assert all(np.array_equal(loaded.weights[k], v) for k, v in expert.weights.items())
  assert info["weights_bytes"] == os.path.getsize(os.path.join(str(tmp_path / "0"), "expert.safetensors"))


# ---------------------------------------------------------------------------------------------- failures


def test_a_missing_base_checkpoint_fails_the_experts_stage(web, tmp_path):
  missing = str(tmp_path / "no_such_base")
  config = make_config(missing, [UP_TO_EXPERTS])
  with pytest.raises(ValueError, match=r"stage experts: all 4 tasks failed.*experts\.base_checkpoint") as info:
    run(web, str(tmp_path / "out"), config)
  assert missing in str(info.value)


def test_one_failing_cluster_is_counted_as_expert_failed(main_run, web, tmp_path):
  out, stats, config = main_run
  copy = copy_run(out, str(tmp_path / "one_fails"))
  for folder in ("_done/experts", "_done/targets", "icl"):
    shutil.rmtree(os.path.join(copy, folder))
  os.remove(os.path.join(copy, "stats.json"))
  victim = cluster_ids(copy)[0]
  shutil.rmtree(os.path.join(copy, "experts", victim))
  with open(os.path.join(copy, "experts", victim), "w") as f:
    f.write("a file where the expert's folder goes: saving the expert fails")

  again = run(web, copy, config)
  assert_balanced(again)
  e = again["stages"]["experts"]
  assert (e["in"], e["out"], e["dropped"]) == (4, 3, {"expert_failed": 1})
  assert again["failed"]["experts"]["tasks"] == 1
  assert again["counters"]["targets_clusters_without_expert"] == 1
  t = again["stages"]["targets"]
  assert t["in"] == 3 * PROMPTS_PER_CLUSTER * SEEDS_PER_PROMPT
  written = read_icl(copy)
  assert victim not in {e.meta["cluster_id"] for examples in written.values() for e in examples}
  assert len(written["train"]) + len(written["val"]) == t["out"]

  # Once the cause is gone, the next run retries the failed expert (and redoes the targets of its bucket).
  os.remove(os.path.join(copy, "experts", victim))
  fixed = run(web, copy, config)
  assert "failed" not in fixed and fixed["stages"] == stats["stages"]
  assert {k: v for k, v in fixed["counters"].items() if k != "expert_train_ms"} == \
         {k: v for k, v in stats["counters"].items() if k != "expert_train_ms"}
  assert icl_bytes(copy) == icl_bytes(out)


# ---------------------------------------------------------------------------------------------- storage


def test_lora_experts_store_only_lora_arrays(main_run, web, base, tmp_path):
  from safetensors import safe_open
  out, _, _ = main_run
  lora_out = str(tmp_path / "lora")
  stats = run(web, lora_out, make_config(base, [UP_TO_EXPERTS, ("experts.method", "lora")]))
  assert stats["stages"]["experts"]["out"] == 4
  for cid in cluster_ids(lora_out):
    folder = os.path.join(lora_out, "experts", cid)
    with open(os.path.join(folder, "expert.json")) as f:
      info = json.load(f)
    size = os.path.getsize(os.path.join(folder, "expert.safetensors"))
    assert info["method"] == "lora" and info["weights_bytes"] == size
    with open(os.path.join(out, "experts", cid, "expert.json")) as f:
      full = json.load(f)
    assert full["method"] == "full" and full["weights_bytes"] == os.path.getsize(
        os.path.join(out, "experts", cid, "expert.safetensors"))
    assert size * 5 < full["weights_bytes"]
    print(f"{cid}: lora expert {size} bytes, full expert {full['weights_bytes']} bytes")
    with safe_open(os.path.join(folder, "expert.safetensors"), framework="numpy") as f:
      keys = list(f.keys())
      assert keys and all(k.rsplit("/", 1)[-1] in ("lora_a", "lora_b") for k in keys)
      assert info["num_params"] == sum(f.get_tensor(k).size for k in keys)


def test_icl_preview_shows_one_row_per_example(main_run):
  from PIL import Image
  from data_pipeline.preview import write_icl_sheet
  out, _, _ = main_run
  path = write_icl_sheet(out, cell=16, gap=2, max_examples=5)
  examples = min(5, len(read_icl(out)["train"]))
  with Image.open(path) as sheet:
    assert sheet.size[1] == 2 + examples * (16 + caption_band() + 2)  # a prompt under each row


def test_a_latent_base_runs_the_experts_and_targets_stages(web, tmp_path):
  """Experts, their renders and the target filter on a latent base (a tiny UNet on a VAE's latents): LoRA experts
  fine-tune in latent space, render decoded 16 px targets, and the ICL shards hold them."""
  base = write_tiny_checkpoint(str(tmp_path / "latent_base"), "toy.py", overrides=TINY_LATENT_OVERRIDES)
  out = str(tmp_path / "out")
  stats = run(web, out, make_config(base, [("experts.method", "lora")]))
  assert_balanced(stats)
  assert stats["stages"]["experts"]["out"] == 4
  examples = [e for split in read_icl(out).values() for e in split]
  assert examples  # some renders pass the filter, so the shards hold decoded latent renders
  assert sum(stats["stages"]["targets"]["dropped"].values()) + len(examples) == stats["stages"]["targets"]["in"]
  for example in examples:
    assert example.target.shape == (16, 16, 3)
