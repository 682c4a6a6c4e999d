"""DreamBooth experts (suti/experts/dreambooth.py): what each method trains and stores, determinism, the prior
preservation weights, settings errors, and that an expert fitted to a toy cluster renders that cluster.

Two trainers are compiled for the whole file (full, and block-wise LoRA on the outer blocks) and one renderer.
"""
import os

import numpy as np
import pytest
from flax import nnx

from suti.toy import world as tw
from suti.embed.clip import embed_images, load_clip_from_config
from suti.config import load_config
from suti.experts.dreambooth import ExpertTrainer, TrainedExpert
from suti.infer.sampler import Sampler
from suti.models.model import SuTIModel
from shared_fixtures import CONFIGS, tiny_config

pytestmark = pytest.mark.costly(seconds=75)  # cold seconds (--durations): costly files start first

SUBJECT = tw.Subject("ball", "red", "stripes", "white")
OTHER = tw.Subject("box", "blue", "dots", "yellow")  # another cluster, for the identity check
TOKEN, NOUN = "sks", "ball"
# Block-wise LoRA on the outer blocks only (as configs/pipeline/toy_icl.py does for the 3-level toy UNet).
CHOSEN = ("unet/down_blocks/0/", "unet/up_blocks/1/")


def cluster_images(subject: tw.Subject) -> list[np.ndarray]:
  """5 renders of one subject in three backgrounds (16 px; the 8 px model trains on them resized)."""
  contexts = [tw.Context(background=b, variant=v) for b in ("grass", "sky") for v in range(2)]
  contexts.append(tw.Context(background="beach", position="left"))
  return [tw.render(subject, c, size=16) for c in contexts]


def experts_settings(**changes):
  """The `experts` section of configs/pipeline/toy_icl.py with test changes."""
  ex = load_config(os.path.join(CONFIGS, "pipeline", "toy_icl.py")).experts
  ex.bind = "token"  # DreamBooth's rare identifier (the toy config binds the class noun; tested apart)
  ex.prior_weight = 0.0  # no class images here: fits the instance images only
  ex.lora.down_ranks, ex.lora.mid_rank, ex.lora.up_ranks = (4, 0), 0, (0, 4)  # the tiny UNet has 2 + 1 + 2 blocks
  for key, value in changes.items():
    node = ex
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return ex


@pytest.fixture(scope="module")
def base():
  cfg = tiny_config()
  weights = nnx.to_pure_dict(nnx.state(SuTIModel(cfg, rngs=nnx.Rngs(0))))
  return cfg, weights


@pytest.fixture(scope="module")
def full_trainer(base):
  return ExpertTrainer(*base, experts_settings(method="full", steps=100, lr=3e-3))


@pytest.fixture(scope="module")
def full_expert(full_trainer) -> TrainedExpert:
  return full_trainer.train(cluster_images(SUBJECT), NOUN, TOKEN, seed=0)


@pytest.fixture(scope="module")
def blockwise_trainer(base):
  return ExpertTrainer(*base, experts_settings(method="blockwise_lora", steps=100, lr=1e-2))


@pytest.fixture(scope="module")
def blockwise_expert(blockwise_trainer) -> TrainedExpert:
  return blockwise_trainer.train(cluster_images(SUBJECT), NOUN, TOKEN, seed=0)


def is_text(name: str) -> bool:
  return name.startswith("text/")


# --- what each method trains and stores --------------------------------------------------------------------
def test_blockwise_lora_changes_only_the_chosen_blocks(blockwise_trainer, blockwise_expert):
  base = blockwise_trainer.base_weights
  merged = blockwise_trainer.merged_weights(blockwise_expert)
  assert set(merged) == set(base)
  outside = [k for k in base if not k.startswith(CHOSEN)]
  assert any(k.startswith("unet/mid_block/") for k in outside) and any(is_text(k) for k in outside)
  for name in outside:
    assert np.array_equal(merged[name], base[name]), name
  for block in CHOSEN:
    moved = [k for k in base if k.startswith(block) and k.endswith("kernel")
             and not np.array_equal(merged[k], base[k])]
    assert moved, f"no kernel of {block} moved"
  # Stored: only the chosen blocks' LoRA arrays, two per adapted layer.
  stored = blockwise_expert.weights
  assert all(k.startswith(CHOSEN) and k.rsplit("/", 1)[1] in ("lora_a", "lora_b") for k in stored)
  adapted = blockwise_trainer.adapted_layers
  assert {b for b, n in adapted.items() if n} == {"down_blocks.0", "up_blocks.1"}
  assert len(stored) == 2 * sum(adapted.values())
  assert blockwise_expert.lora_alpha == 4.0
  assert blockwise_expert.num_params < 0.1 * sum(a.size for a in base.values())


def test_full_method_trains_only_the_unet(full_trainer, full_expert):
  base = full_trainer.base_weights
  unet_names = {k for k in base if k.startswith("unet/")}
  text_names = {k for k in base if is_text(k)}
  assert text_names and unet_names and unet_names | text_names == set(base)
  assert set(full_expert.weights) == unet_names  # every UNet weight, no text weight
  merged = full_trainer.merged_weights(full_expert)
  for name in text_names:
    assert np.array_equal(merged[name], base[name]), name
  moved = [k for k in unet_names if not np.array_equal(merged[k], base[k])]
  assert len(moved) > len(unet_names) // 2
  assert len(full_expert.losses) == 100 and np.all(np.isfinite(full_expert.losses))


def test_merged_full_expert_rejects_foreign_weights(full_trainer, full_expert):
  bad = TrainedExpert("full", dict(full_expert.weights, **{"unet/nowhere/kernel": np.zeros(1)}), 0.0)
  with pytest.raises(ValueError, match="no place"):
    full_trainer.merged_weights(bad)


def test_same_seed_same_expert_other_seed_differs(blockwise_trainer, blockwise_expert):
  images = cluster_images(SUBJECT)
  again = blockwise_trainer.train(images, NOUN, TOKEN, seed=0)
  assert set(again.weights) == set(blockwise_expert.weights)
  for name, value in blockwise_expert.weights.items():
    assert np.array_equal(again.weights[name], value), name
  assert again.losses == blockwise_expert.losses
  # Another seed: another A at the start ...
  p0, p1 = blockwise_trainer.fresh_params(0), blockwise_trainer.fresh_params(1)
  a0 = [v for k, v in _flat(p0).items() if k.endswith("lora_a")]
  a1 = [v for k, v in _flat(p1).items() if k.endswith("lora_a")]
  assert a0 and all(not np.array_equal(x, y) for x, y in zip(a0, a1))
  assert all(not np.any(v) for k, v in _flat(p0).items() if k.endswith("lora_b"))  # B = 0: starts at the base
  # ... other batches ...
  instance = np.stack([np.full((8, 8, 3), i / 10, np.float32) for i in range(5)])
  b0 = next(blockwise_trainer.batches(instance, None, NOUN, TOKEN, np.random.default_rng(0)))
  b1 = next(blockwise_trainer.batches(instance, None, NOUN, TOKEN, np.random.default_rng(1)))
  assert not np.array_equal(np.asarray(b0["images"]), np.asarray(b1["images"]))
  # ... and another expert.
  other = blockwise_trainer.train(images, NOUN, TOKEN, seed=1)
  assert any(not np.array_equal(other.weights[k], v) for k, v in blockwise_expert.weights.items())
  assert other.losses != blockwise_expert.losses


def _flat(params) -> dict[str, np.ndarray]:
  from suti.core.tree_paths import flatten_dict
  return {k: np.asarray(v) for k, v in flatten_dict(nnx.to_pure_dict(params)).items()}


# --- prior preservation ------------------------------------------------------------------------------------
def test_prior_preservation_batch_and_weights(base):
  b, lam = 3, 0.4
  trainer = ExpertTrainer(*base, experts_settings(batch_size=b, prior_weight=lam))  # never steps: no compile
  instance = np.stack([np.full((8, 8, 3), -0.5 + 0.1 * i, np.float32) for i in range(4)])
  class_images = np.stack([np.full((8, 8, 3), 0.5 + 0.1 * i, np.float32) for i in range(4)])
  batch = next(trainer.batches(instance, class_images, NOUN, TOKEN, np.random.default_rng(0)))
  images, weights = np.asarray(batch["images"]), np.asarray(batch["loss_weight"])
  assert images.shape == (2 * b, 8, 8, 3)
  assert all(any(np.array_equal(im, x) for x in instance) for im in images[:b])
  assert all(any(np.array_equal(im, x) for x in class_images) for im in images[b:])
  np.testing.assert_array_equal(weights, np.array([2.0] * b + [2.0 * lam] * b, np.float32))
  ids = np.asarray(batch["ids"])
  assert ids.shape[0] == 2 * b
  assert all(np.array_equal(ids[i], ids[0]) for i in range(b)) and all(np.array_equal(ids[i], ids[b]) for i in
                                                                        range(b, 2 * b))
  model = SuTIModel(base[0], rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(ids[0], model.tokenize([f"a {TOKEN} {NOUN}"])[0][0])
  np.testing.assert_array_equal(ids[b], model.tokenize([f"a {NOUN}"])[0][0])
  # The weighted mean of per-example losses is the DreamBooth objective, in closed form.
  losses = np.random.default_rng(1).random(2 * b).astype(np.float64)
  np.testing.assert_allclose(np.mean(weights * losses), losses[:b].mean() + lam * losses[b:].mean(), rtol=1e-6)

  # Without class images, or with prior_weight 0: b instance rows, weight 1.
  for t, cls in ((trainer, None), (trainer, class_images[:0]),
                 (ExpertTrainer(*base, experts_settings(batch_size=b, prior_weight=0.0)), class_images)):
    batch = next(t.batches(instance, cls, NOUN, TOKEN, np.random.default_rng(0)))
    assert np.asarray(batch["images"]).shape[0] == b and np.asarray(batch["ids"]).shape[0] == b
    np.testing.assert_array_equal(np.asarray(batch["loss_weight"]), np.ones(b, np.float32))


# --- binding the subject: caption prompts, the class noun ----------------------------------------------------
def test_instance_prompt_from_caption():
  from suti.experts.dreambooth import instance_prompt_from_caption as prompt
  assert prompt("a picture of a green starfish with purple dots in the snow", "starfish", "sks", "F") == \
      "a picture of a sks starfish with purple dots in the snow"
  assert prompt("a black and white photo of a small red heart at night", "heart", "", "F") == \
      "a black and white photo of a heart at night"  # bind=class_noun: no token, no gap
  assert prompt("Starfish, on sale!", "starfish", "sks", "F") == "sks starfish on sale!"  # no article: the noun alone
  assert prompt("IMG_0042", "starfish", "sks", "a sks starfish") == "a sks starfish"


def test_render_prompt_and_expert_token():
  from suti.experts.dreambooth import expert_token, render_prompt
  assert expert_token(experts_settings(), "sks") == "sks"
  assert expert_token(experts_settings(bind="class_noun"), "sks") == ""
  assert render_prompt("a sks ball on the beach", "sks", "") == "a ball on the beach"
  assert render_prompt("a sks ball on the beach", "sks", "sks") == "a sks ball on the beach"
  assert render_prompt("asks a sks ball", "sks", "zqx") == "asks a zqx ball"  # whole words only


def test_caption_prompts_give_each_image_its_own_prompt(base):
  trainer = ExpertTrainer(*base, experts_settings(batch_size=16, bind="class_noun"))  # never steps: no compile
  instance = np.stack([np.full((8, 8, 3), 0.1 * i, np.float32) for i in range(3)])
  captions = [f"a red {NOUN} on the beach", "IMG_0042", f"a sketch of a {NOUN} in the snow"]
  batch = next(trainer.batches(instance, None, NOUN, "", np.random.default_rng(0), captions))
  model = SuTIModel(base[0], rngs=nnx.Rngs(0))
  expected = model.tokenize([f"a {NOUN} on the beach", f"a {NOUN}", f"a sketch of a {NOUN} in the snow"])[0]
  images, ids = np.asarray(batch["images"]), np.asarray(batch["ids"])
  seen = set()
  for image, row in zip(images, ids):
    k = int(round(float(image[0, 0, 0]) / 0.1))  # which instance image this row shows
    np.testing.assert_array_equal(row, expected[k])  # ... trains with that image's own prompt
    seen.add(k)
  assert seen == {0, 1, 2}
  with pytest.raises(ValueError, match="3 instance images but 2 captions"):
    next(trainer.batches(instance, None, NOUN, "", np.random.default_rng(0), captions[:2]))


# --- errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes,match", [
    (dict(method="dreambooth"), "experts.method"),
    (dict(steps=0), "experts.steps"),
    (dict(batch_size=0), "experts.batch_size"),
    (dict(prior_weight=-1.0), "experts.prior_weight"),
    (dict(instance_prompt="a special {noun}"), r"\{token\}"),
    (dict(bind="word"), "experts.bind"),
    (dict(bind="class_noun", prior_weight=1.0), "set experts.prior_weight=0"),
])
def test_bad_settings(base, changes, match):
  with pytest.raises(ValueError, match=match):
    ExpertTrainer(*base, experts_settings(**changes))


def test_apprentice_base_is_rejected(base):
  apprentice = tiny_config(overrides=[("model.num_neighbors", "3")])
  with pytest.raises(ValueError, match="num_neighbors"):
    ExpertTrainer(apprentice, base[1], experts_settings())


def test_expert_needs_images(full_trainer):
  with pytest.raises(ValueError, match="at least one image"):
    full_trainer.train([], NOUN, TOKEN)


# --- the point of an expert: its samples look like its cluster ---------------------------------------------
@pytest.fixture(scope="module")
def toy_clip():
  return load_clip_from_config(load_config(os.path.join(CONFIGS, "pipeline", "toy.py")))[0]


@pytest.fixture(scope="module")
def renderer(base):
  return Sampler.for_config(base[0], batch_size=8, sample_overrides={"steps": 15})


def clip_i(clip, images, reference) -> float:
  """Mean cosine between the toy CLIP embeddings of `images` and of `reference` (all pairs)."""
  return float((embed_images(clip, list(images), 64) @ embed_images(clip, list(reference), 64).T).mean())


@pytest.mark.parametrize("method", ["full", "blockwise_lora"])
def test_expert_raises_clip_i_to_its_cluster(method, request, renderer, toy_clip):
  trainer = request.getfixturevalue(f"{method.split('_')[0]}_trainer")
  expert = request.getfixturevalue(f"{method.split('_')[0]}_expert")
  prompts = [f"a {TOKEN} {NOUN}"] * 8
  cluster, other = cluster_images(SUBJECT), cluster_images(OTHER)
  base_renders = renderer.render(trainer.base_weights, prompts, seed=0)
  expert_renders = renderer.render(trainer.merged_weights(expert), prompts, seed=0)
  base_score, expert_score = clip_i(toy_clip, base_renders, cluster), clip_i(toy_clip, expert_renders, cluster)
  # Measured (random-init base, 100 steps, 8 renders at 15 DDIM steps): CLIP-I to the cluster base 0.34 ->
  # full expert (lr 3e-3) 0.77, block-wise LoRA (lr 1e-2) 0.57 (plain LoRA rank 4, lr 1e-2: 0.69).
  assert expert_score > base_score + 0.15, (base_score, expert_score)
  # The rise is this cluster's: to another subject in the same backgrounds CLIP-I does not rise (measured
  # 0.69 -> 0.53 full, 0.69 -> 0.68 block-wise; the base's noise happens to resemble that cluster more).
  other_gain = clip_i(toy_clip, expert_renders, other) - clip_i(toy_clip, base_renders, other)
  assert expert_score - base_score > other_gain + 0.15, (expert_score - base_score, other_gain)
