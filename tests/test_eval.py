"""`suti eval`: metric closed forms, toy ground truth, the benchmark layout, the DreamBench converter, the DINO
loader, and a whole evaluation of tiny models with every method."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from suti.toy import world as tw
from shared_fixtures import write_tiny_checkpoint
from suti import cli
from suti.eval import metrics
from suti.eval.scoring import summarize
from suti.toy import truth as toy_truth
from suti.eval.benchmark import read_benchmark
from suti.eval.dreambench import convert_dreambench, parse_prompts_and_classes

pytestmark = pytest.mark.costly(seconds=80)  # cold seconds (--durations): costly files start first

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DREAMBENCH = os.path.join(os.path.dirname(ROOT), "shared", "dreambench")


def _unit(v):
  v = np.asarray(v, np.float64)
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


# ---- metrics ---------------------------------------------------------------------------------------------------

def test_mean_pairwise_and_leave_one_out_cosine():
  e = np.eye(3)
  assert metrics.mean_pairwise_cosine(e[:1], e) == pytest.approx(1 / 3)
  real = _unit([[1, 0], [1, 1], [0, 1]])
  # off-diagonal cosines: 1/sqrt2, 0, 1/sqrt2 (each twice) -> mean sqrt2/3
  assert metrics.leave_one_out_cosine(real) == pytest.approx(np.sqrt(2) / 3)
  with pytest.raises(ValueError, match="at least two"):
    metrics.leave_one_out_cosine(real[:1])


def test_identity_ranks_and_ties():
  g = _unit([[1, 0.5, 0.2], [0.2, 1, 0.5], [0.5, 0.2, 1]])
  # candidate c's mean cosine to image i is component c of g[i] (candidate 1 has two identical references)
  candidates = [_unit([[1, 0, 0]]), _unit([[0, 1, 0], [0, 1, 0.0]]), _unit([[0, 0, 1]])]
  np.testing.assert_array_equal(metrics.identity_ranks(g, candidates, 0), [0, 2, 1])
  np.testing.assert_array_equal(metrics.identity_ranks(g, candidates, 2), [2, 1, 0])
  # a constant image ties every candidate: the tie counts against the true subject
  np.testing.assert_array_equal(metrics.identity_ranks(np.zeros((1, 3)), candidates, 1), [2])


def test_zero_shot_choice_shared_and_per_image_options():
  g = _unit([[1, 0.1], [0.1, 1]])
  np.testing.assert_array_equal(metrics.zero_shot_choice(g, np.eye(2)), [0, 1])
  per_image = np.stack([np.eye(2)[::-1], np.eye(2)])
  np.testing.assert_array_equal(metrics.zero_shot_choice(g, per_image), [1, 1])


def test_rowwise_cosine_pairs_row_i_with_row_i_only():
  e = np.eye(3)
  # orthonormal rows: 1 where the text is the image's own vector, 0 for any other basis vector
  np.testing.assert_array_equal(metrics.rowwise_cosine(e, e), [1.0, 1.0, 1.0])
  np.testing.assert_array_equal(metrics.rowwise_cosine(e, e[[1, 2, 0]]), [0.0, 0.0, 0.0])
  np.testing.assert_array_equal(metrics.rowwise_cosine(e, e[[0, 2, 1]]), [1.0, 0.0, 0.0])
  images = _unit([[1, 0], [1, 1], [0, 1], [-1, 0]])
  texts = _unit([[1, 0], [1, 0], [1, 0], [1, 0]])
  np.testing.assert_allclose(metrics.rowwise_cosine(images, texts), [1, 1 / np.sqrt(2), 0, -1], atol=1e-12)
  assert metrics.rowwise_cosine(images, texts).shape == (4,)
  with pytest.raises(ValueError, match="differ in shape"):
    metrics.rowwise_cosine(e, e[:2])
  with pytest.raises(ValueError, match=r"must be \[N, D\] embeddings"):
    metrics.rowwise_cosine(e[0], e[0])


def test_summarize_means_over_every_image_of_every_subject():
  per_image = {
      "clip_i": [np.array([0.1, 0.2]), np.array([0.6])],  # two subjects: the mean is over the 3 images, 0.3
      "clip_t": [np.array([1.0, 0.0, 0.0])],  # 1/3 -> 0.3333
      "dino": [],  # no DINO checkpoint: absent, not 0
      "identity_rank": [np.array([0.0, 1.0]), np.array([0.0, 3.0])],  # 2 of 4 ranked first; mean rank 1
      "context_ok": [np.array([1.0, 0.0, 1.0, 1.0])],
      "near_copy": [np.array([0.0, 1.0, 0.0]), np.array([0.0])],
      "not_a_metric": [np.array([5.0])],  # only the per-image metrics the scorer writes are summarised
  }
  assert summarize(per_image) == {"clip_i": 0.3, "clip_t": 0.3333, "identity_accuracy": 0.5,
                                  "identity_mean_rank": 1.0, "context_accuracy": 0.75, "near_copy_rate": 0.25}
  # rounding: accuracies to 4 places, the mean rank to 3
  assert summarize({"identity_rank": [np.array([0.0, 0.0, 1.0])]}) == {
      "identity_accuracy": 0.6667, "identity_mean_rank": 0.333}
  assert summarize({}) == {}


class _FakeEmbedder:
  """images: a lookup by the image's first pixel value; texts: a lookup by the exact text (KeyError otherwise).
  Records every texts() call."""

  def __init__(self, image_table, text_table=None):
    self.image_table, self.text_table, self.text_calls = image_table, text_table or {}, []

  def images(self, images):
    return np.stack([self.image_table[int(np.asarray(img)[0, 0, 0])] for img in images])

  def texts(self, texts):
    self.text_calls.append(list(texts))
    return np.stack([self.text_table[t] for t in texts])


def _flat(value):
  return np.full((8, 8, 3), value, np.uint8)


def _scorer(clip, dino=None):
  import ml_collections as mlc
  from suti.eval.scoring import Scorer
  eval_cfg = mlc.ConfigDict({"near_copy_pixel_threshold": 10.0, "near_copy_clip_threshold": 0.9})
  return Scorer(clip, dino, eval_cfg, mlc.ConfigDict({"identity_candidates": 0, "distractor_references": 1}), 8)


def test_scorer_score_on_hand_made_embeddings():
  from suti.eval.benchmark import BenchmarkSubject
  from suti.eval.scoring import SubjectReference
  e = np.eye(3)
  d, f = _unit([2, 1, 0]), _unit([1, 2, 0])  # cosines to e0, e1: (2, 1)/sqrt5 and (1, 2)/sqrt5
  # A is the demo itself (pixel 100); B has the demo's CLIP embedding but other pixels; C is 4 levels off the
  # demo (a pixel copy, CLIP-orthogonal); E is exactly at the pixel threshold (10 levels: not "below").
  table = {100: e[0], 200: e[0], 104: e[2], 0: d, 110: f}
  beach, snow = "a teapot on the beach", "a teapot in the snow"
  clip = _FakeEmbedder(table, {beach: e[0], snow: e[1]})  # only token-free prompts are known
  subject = BenchmarkSubject("teapot", "teapot", "sks", [], [])
  ref = SubjectReference(subject, clip_real=e[[0, 2]], dino_real=e[[1]], demo_pixels=[_flat(100)],
                         demo_clip=e[[0]], candidates=[e[[0]], e[[1]], e[[2]]])
  images = np.stack([_flat(v) for v in (100, 200, 104, 0, 110)])
  prompts = ["a sks teapot on the beach", "a sks teapot in the snow", "a sks teapot in the snow",
             "a sks teapot on the beach", "a sks teapot on the beach"]
  r5 = 1 / np.sqrt(5)
  scorer = _scorer(clip, dino=_FakeEmbedder(table))
  out = scorer.score(ref, images, prompts)
  assert set(out) == {"clip_i", "clip_t", "dino", "near_copy", "identity_rank"}  # not a toy subject: no context
  assert all(v.shape == (5,) for v in out.values())
  np.testing.assert_allclose(out["clip_i"], [0.5, 0.5, 0.5, r5, r5 / 2], atol=1e-12)  # mean cosine to e0, e2
  np.testing.assert_allclose(out["clip_t"], [1, 0, 0, 2 * r5, r5], atol=1e-12)
  np.testing.assert_allclose(out["dino"], [0, 0, 0, r5, 2 * r5], atol=1e-12)
  np.testing.assert_array_equal(out["near_copy"], [1, 1, 1, 0, 0])
  # candidates e0 (true), e1, e2; C ties e1 with the truth (counts against it) and loses to e2
  np.testing.assert_array_equal(out["identity_rank"], [0, 0, 2, 0, 1])
  assert summarize({k: [v] for k, v in out.items()})["identity_accuracy"] == 0.6
  # the text embeddings are computed once per distinct token-free prompt, then cached by the scorer
  assert clip.text_calls == [[snow, beach]]
  scorer.score(ref, images, prompts[::-1])
  assert clip.text_calls == [[snow, beach]]
  # without DINO and candidates those metrics are absent
  ref.candidates = []
  assert set(_scorer(clip).score(ref, images, prompts)) == {"clip_i", "clip_t", "near_copy"}
  with pytest.raises(ValueError, match="5 images for 4 prompts"):
    _scorer(clip).score(ref, images, prompts[:4])


def test_scorer_context_accuracy_on_a_toy_subject():
  from suti.eval.benchmark import BenchmarkSubject
  from suti.eval.scoring import SubjectReference
  words = ("beach", "grass", "snow", "night", "sky", "ocean", "city", "room")
  assert words == tw.BACKGROUNDS
  e = np.eye(len(words))

  class BackgroundText(_FakeEmbedder):  # a text embeds as the one background word it names
    def texts(self, texts):
      self.text_calls.append(list(texts))
      return np.stack([e[[w in t.split() for w in words].index(True)] for t in texts])

  # images 10*(i+1) "show" background i
  clip = BackgroundText({10 * (i + 1): e[i] for i in range(len(words))})
  subject = BenchmarkSubject("ball-red-plain", "ball", "sks", [], [])
  ref = SubjectReference(subject, clip_real=e[[0]], dino_real=None, demo_pixels=[_flat(255)], demo_clip=e[[7]],
                         toy=toy_truth.toy_subject("ball-red-plain", "ball"))
  prompts = ["a sks ball on the beach", "a sks ball in the snow", "a sks ball at night", "a sks ball in a room"]
  images = np.stack([_flat(v) for v in (10, 20, 40, 70)])  # beach, grass, night, city
  out = _scorer(clip).score(ref, images, prompts)
  assert set(out) == {"clip_i", "clip_t", "near_copy", "context_ok"}
  np.testing.assert_array_equal(out["context_ok"], [1, 0, 1, 0])
  np.testing.assert_array_equal(out["clip_t"], [1, 0, 1, 0])
  np.testing.assert_array_equal(out["clip_i"], [1, 0, 0, 0])
  np.testing.assert_array_equal(out["near_copy"], [0, 0, 0, 0])
  assert summarize({k: [v] for k, v in out.items()}) == {
      "clip_i": 0.25, "clip_t": 0.5, "near_copy_rate": 0.0, "context_accuracy": 0.5}


# ---- toy ground truth ------------------------------------------------------------------------------------------

def test_distractors_are_other_heldout_subjects_of_the_class_and_fixed():
  subject = tw.subjects_of_split("heldout")[5]
  d = toy_truth.distractors(subject, 9)
  assert len(d) == 9 == len(set(d)) and subject not in d
  assert all(s.shape == subject.shape and tw.split_of(s) == "heldout" for s in d)
  assert d == toy_truth.distractors(subject, 9)
  assert toy_truth.toy_subject(subject.id, subject.cls) == subject
  assert toy_truth.toy_subject(subject.id, "kite" if subject.cls != "kite" else "ball") is None
  assert toy_truth.toy_subject("teapot", "teapot") is None


def test_background_options_change_only_the_background():
  prompt = "a sketch of a sks kite wearing a hat in the snow"
  options, truth = toy_truth.background_options(prompt, "kite")
  assert len(options) == len(tw.BACKGROUNDS) and options[truth] == "a sketch of a kite wearing a hat in the snow"
  assert all(tw.prompt_context(o).accessory == "hat" and tw.prompt_context(o).style == "sketch" for o in options)
  assert [tw.prompt_context(o).background for o in options] == list(tw.BACKGROUNDS)


def test_prompt_render_matches_the_world_renderer():
  s = tw.Subject("ball", "red")
  np.testing.assert_array_equal(toy_truth.prompt_render(s, "a sks ball on the beach", 32, variant=2),
                                tw.render(s, tw.Context("beach", variant=2), 32))
  assert toy_truth.prompt_render(s, "a sks ball on the beach", 8).shape == (8, 8, 3)


# ---- the benchmark layout and DreamBench ---------------------------------------------------------------------

def _fake_dreambench(root):
  """A DreamBench-shaped folder: the class table and both prompt lists in the original's syntax."""
  text = ["Classes", "", "subject_name,class", "teapot,teapot", "dog2,dog", "", "Prompts", "", "Object Prompts", "",
          "prompt_list = ["]
  text += [f"'a {{0}} {{1}} {p}'.format(unique_token, class_token)," for p in ("in the jungle", "on the beach")]
  text += ["]", "", "Live Subject Prompts", "", "prompt_list = ["]
  text += [f"'a {{0}} {{1}} {p}'.format(unique_token, class_token)," for p in ("in the snow", "wearing a red hat")]
  text += ["'a red {0} {1}'.format(unique_token, class_token)", "]"]
  os.makedirs(root)
  with open(os.path.join(root, "prompts_and_classes.txt"), "w") as f:
    f.write("\n".join(text))
  rng = np.random.default_rng(0)
  for name, count in (("teapot", 3), ("dog2", 2)):
    os.makedirs(os.path.join(root, name))
    for i in range(count):
      Image.fromarray(rng.integers(0, 255, (30, 20, 3), np.uint8)).save(os.path.join(root, name, f"{i:02d}.jpg"))
  (open(os.path.join(root, "teapot", "notes.txt"), "w")).write("not an image")


def test_eval_sampler_settings_default_to_the_checkpoints_and_override_each_key():
  from configs import toy_suti
  from configs.eval import toy as eval_toy
  from suti.eval.main import sample_overrides
  from suti.diffusion.sample_settings import sample_settings
  cfg = eval_toy.get_config()
  own = toy_suti.get_config().sample
  assert sample_settings(own, sample_overrides(cfg)).to_dict() == own.to_dict()
  with cfg.unlocked():
    cfg.sample.guidance_mode, cfg.sample.interleave_eta, cfg.sample.neighbor_scale = "interleaved", 0.0, 4.0
  got = sample_settings(own, sample_overrides(cfg))
  assert (got.guidance_mode, got.interleave_eta, got.neighbor_scale, got.text_scale) == \
      ("interleaved", 0.0, 4.0, own.text_scale)


def test_convert_dreambench_layout(tmp_path):
  src, out = str(tmp_path / "db"), str(tmp_path / "bench")
  _fake_dreambench(src)
  summary = convert_dreambench(src, out)
  assert summary == {"subjects": 2, "images": 5, "skipped_images": 0}
  with open(os.path.join(out, "prompts.json")) as f:
    prompts = json.load(f)
  assert prompts["teapot"] == {"class": "teapot", "token": "sks",
                               "prompts": ["a sks teapot in the jungle", "a sks teapot on the beach"]}
  assert prompts["dog2"]["prompts"] == ["a sks dog in the snow", "a sks dog wearing a red hat", "a red sks dog"]
  bench = read_benchmark(out)
  assert [s.name for s in bench.subjects] == ["dog2", "teapot"]
  assert [len(s.images) for s in bench.subjects] == [2, 3] and bench.subjects[1].images[0].shape == (30, 20, 3)
  assert sorted(os.listdir(os.path.join(out, "teapot"))) == ["00.png", "01.png", "02.png"]


@pytest.mark.skipif(not os.path.isdir(SHARED_DREAMBENCH), reason="the shared DreamBench copy is not on this machine")
def test_convert_the_real_dreambench_copy(tmp_path):
  with open(os.path.join(SHARED_DREAMBENCH, "prompts_and_classes.txt")) as f:
    classes, objects, live = parse_prompts_and_classes(f.read())
  assert len(classes) == 30 and len(objects) == len(live) == 25
  assert sum(c in ("cat", "dog") for c in classes.values()) == 9
  files = sum(len([f for f in os.listdir(os.path.join(SHARED_DREAMBENCH, s)) if f.endswith(".jpg")]) for s in classes)
  summary = convert_dreambench(SHARED_DREAMBENCH, str(tmp_path / "bench"))
  assert summary == {"subjects": 30, "images": files, "skipped_images": 0}
  bench = read_benchmark(str(tmp_path / "bench"))
  assert sum(len(s.prompts) for s in bench.subjects) == 750  # 30 subjects x 25 prompts


def test_benchmark_skips_unreadable_images_and_names_errors(tmp_path):
  root = tmp_path / "b"
  (root / "ball-red-plain").mkdir(parents=True)
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "ball-red-plain" / "00.png")
  (root / "ball-red-plain" / "01.png").write_bytes(b"\x89PNG garbage")
  (root / "prompts.json").write_text(json.dumps({"ball-red-plain": {"class": "ball", "prompts": ["a sks ball"]}}))
  bench = read_benchmark(str(root))
  assert len(bench.subjects[0].images) == 1 and list(bench.skipped_images.values()) == ["undecodable_image"]
  (root / "prompts.json").write_text(json.dumps({"ball-red-plain": {"class": "ball", "prompts": []}}))
  with pytest.raises(ValueError, match="needs a non-empty list of prompts"):
    read_benchmark(str(root))
  (root / "prompts.json").write_text(json.dumps({"kite-red-plain": {"class": "kite", "prompts": ["a sks kite"]}}))
  with pytest.raises(ValueError, match="has no folder"):
    read_benchmark(str(root))
  (root / "prompts.json").write_text("{not json")
  with pytest.raises(ValueError, match="is not valid JSON"):
    read_benchmark(str(root))


# ---- DINO ------------------------------------------------------------------------------------------------------

def test_dino_embedder_loads_a_local_timm_checkpoint(tmp_path):
  import timm
  import torch
  from safetensors.torch import save_file

  from suti.embed.dino import DinoEmbedder
  model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  save_file(state, str(tmp_path / "dino.safetensors"))
  torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}}, str(tmp_path / "dino.pth"))
  images = [np.random.default_rng(i).integers(0, 255, (16, 16, 3), np.uint8) for i in range(2)]
  x = DinoEmbedder("vit_tiny_patch16_224", str(tmp_path / "dino.safetensors"))._tensor(images)
  with torch.inference_mode():
    expected = model(x).numpy()
  expected /= np.linalg.norm(expected, axis=1, keepdims=True)
  for file in ("dino.safetensors", "dino.pth"):
    got = DinoEmbedder("vit_tiny_patch16_224", str(tmp_path / file)).images(images)
    np.testing.assert_allclose(got, expected, atol=1e-5)
  with pytest.raises(ValueError, match="does not fit vit_small_patch16_224"):
    DinoEmbedder("vit_small_patch16_224", str(tmp_path / "dino.safetensors"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    DinoEmbedder("vit_tiny_patch16_224", str(tmp_path / "none.pth"))


# ---- a whole evaluation ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  from suti.toy.web import write_toyweb
  root = tmp_path_factory.mktemp("eval")
  write_toyweb(str(root / "web"), 2, seed=0, benchmark_per_class=1)
  app = write_tiny_checkpoint(str(root / "app"), live_neighbors=True)
  base = write_tiny_checkpoint(str(root / "base"), "toy.py")
  out = root / "out"
  args = ["eval", "--checkpoint", app, "--benchmark", str(root / "web" / "benchmark"), "--out", str(out),
          "--no-progress", "--config.eval.max_subjects=2", "--config.eval.max_prompts=3",
          "--config.eval.images_per_prompt=2", "--config.eval.batch_size=4", "--config.sample.steps=3",
          f"--config.dreambooth.base_checkpoint={base}", "--config.dreambooth.steps=3",
          "--config.dreambooth.num_class_images=2", "--config.eval.report_prompts=2"]
  assert cli.main(args) == 0
  with open(out / "metrics.json") as f:
    return out, json.load(f)


def test_eval_writes_every_image_and_metric(evaluated):
  out, m = evaluated
  assert set(m["methods"]) == {"suti", "text_only", "dreambooth", "copy", "real_renders", "real_images"}
  subjects = sorted(m["per_subject"])
  assert len(subjects) == 2
  for method in ("suti", "text_only", "dreambooth", "copy"):
    r = m["methods"][method]
    for key in ("clip_i", "clip_t", "identity_accuracy", "context_accuracy", "near_copy_rate", "seconds_per_subject"):
      assert key in r, (method, key)
    assert 0 <= r["identity_accuracy"] <= 1 and -1 <= r["clip_i"] <= 1
    for s in subjects:
      files = sorted(os.listdir(out / "images" / method / s))
      assert files == [f"{p:02d}_{n}.png" for p in range(3) for n in range(2)]
  assert "dino" not in m["methods"]["suti"]  # no DINO checkpoint configured
  assert m["methods"]["copy"]["near_copy_rate"] == 1.0  # a copied demo is a copy
  assert m["methods"]["suti"]["near_copy_rate"] == 0.0
  # the copies are the demos at the model's resolution, cycled
  first = np.asarray(Image.open(out / "images" / "copy" / subjects[0] / "00_0.png"))
  demo = np.asarray(Image.open(os.path.join(m["benchmark"], subjects[0], "00.png")))
  from suti.core.image_ops import resize_and_crop
  np.testing.assert_array_equal(first, resize_and_crop(demo, 8))


def test_eval_report_has_the_table_and_grids(evaluated):
  out, m = evaluated
  page = (out / "report.html").read_text()
  for method in m["methods"]:
    assert f"<td>{method}</td>" in page
  md = (out / "report.md").read_text()
  assert sum(line.startswith("| suti |") for line in md.splitlines()) == 1 and "identity acc." in md
  for s in m["per_subject"]:
    grid = np.asarray(Image.open(out / "grids" / f"{s}.png"))
    from suti.viz.contact_sheet import contact_sheet
    tile = [np.zeros((8, 8, 3), np.uint8)]
    n_demos = min(3, len(os.listdir(os.path.join(m["benchmark"], s))))
    expected = contact_sheet([[tile * n_demos] + [tile] * 5] * 2, captions=["p"] * 2, scale=8)
    assert grid.shape == expected.shape  # 2 prompts x (demos | 4 methods | real render)


def test_eval_errors_are_one_line(tmp_path, capsys):
  app = write_tiny_checkpoint(str(tmp_path / "app"))
  assert cli.main(["eval", "--checkpoint", app, "--benchmark", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
  assert "benchmark folder" in capsys.readouterr().err
  base = write_tiny_checkpoint(str(tmp_path / "base"), "toy.py")
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "prompts.json").write_text("{}")
  assert cli.main(["eval", "--checkpoint", base, "--benchmark", str(tmp_path / "b"), "--out", str(tmp_path)]) == 2
  assert "must map at least one subject" in capsys.readouterr().err
  assert cli.main(["eval", "--checkpoint", app, "--benchmark", str(tmp_path / "b"), "--out", str(tmp_path),
                   "--config.eval.methodz=1"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "unknown config key 'eval.methodz'" in err


def test_eval_real_renders_beat_text_only_on_identity(evaluated):
  """The toy ceiling (the true subject rendered in each prompt's context) is identified more often than what the
  apprentice draws from the prompt alone, which names the class but not the subject."""
  _, m = evaluated
  real, text_only = m["methods"]["real_renders"], m["methods"]["text_only"]
  assert real["identity_accuracy"] > text_only["identity_accuracy"]
