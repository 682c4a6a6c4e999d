"""DreamBooth experts: the base text-to-image model fine-tuned on one cluster's images.

The subject is bound to a rare identifier token: every instance image is trained with the prompt
`experts.instance_prompt` ("a sks ball"). Class-prior preservation keeps the class noun meaning what it meant:
each step also trains on images the *base* model rendered for `experts.class_prompt` ("a ball"), and the loss
is  mean(instance) + lambda * mean(class)  (`experts.prior_weight`; 0 turns it off).

Methods (`experts.method`):
  full            every UNet weight is trained and stored (the text encoder stays frozen, as DreamBooth on Imagen);
  lora            LoRA on the attention projections (and convolutions with lora.conv) of every block;
  blockwise_lora  LoRA with a rank per block (lora.down_ranks / mid_rank / up_ranks; rank 0 skips a block).
A LoRA expert stores only its LoRA arrays and is merged into the base weights for sampling.

One `ExpertTrainer` per process compiles the step once (suti.train.step.make_train_step, the trainer's own step)
and then trains any number of experts: each expert starts from fresh trainable arrays (the base weights for
full, new A and zero B for LoRA), so experts are independent of the order they were trained in.
"""
from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx

from suti.core.image_ops import resize_and_crop, to_model_range
from suti.core.tree_paths import flatten_dict
from suti.diffusion.schedules import make_schedule
from suti.models import lora as lora_lib
from suti.models.load_weights import load_weights
from suti.models.model import SuTIModel, null_text, output_size
from suti.train.optim import make_optimizer
from suti.train.step import init_train_state, make_train_step, step_rng

METHODS = ("full", "lora", "blockwise_lora")
BINDINGS = ("token", "class_noun")


@dataclass
class TrainedExpert:
  """What an expert keeps: its trainable arrays (LoRA arrays, or every UNet weight for full) and how it went."""
  method: str
  weights: dict[str, np.ndarray]  # flat, keyed by model path ('unet/.../to_q/lora_a' or 'unet/.../kernel')
  lora_alpha: float
  losses: list[float] = field(default_factory=list)
  seconds: float = 0.0

  @property
  def num_bytes(self) -> int:
    return int(sum(a.nbytes for a in self.weights.values()))

  @property
  def num_params(self) -> int:
    return int(sum(a.size for a in self.weights.values()))


def check_settings(experts_cfg: mlc.ConfigDict) -> None:
  if experts_cfg.method not in METHODS:
    raise ValueError(f"experts.method must be one of {METHODS}, got {experts_cfg.method!r}")
  for key in ("steps", "batch_size"):
    if int(experts_cfg[key]) < 1:
      raise ValueError(f"experts.{key} must be >= 1, got {experts_cfg[key]}")
  if float(experts_cfg.prior_weight) < 0:
    raise ValueError(f"experts.prior_weight must be >= 0, got {experts_cfg.prior_weight}")
  if "{token}" not in experts_cfg.instance_prompt:
    raise ValueError(f"experts.instance_prompt must contain {{token}}: {experts_cfg.instance_prompt!r}")
  if experts_cfg.get("bind", "token") not in BINDINGS:
    raise ValueError(f"experts.bind must be one of {BINDINGS}, got {experts_cfg.bind!r}")
  if experts_cfg.get("bind", "token") == "class_noun" and float(experts_cfg.prior_weight) > 0:
    raise ValueError("experts.bind=class_noun trains the class prompt itself on the subject, so class-prior "
                     "preservation would pull the same prompt towards other images: set experts.prior_weight=0")


def expert_token(experts_cfg: mlc.ConfigDict, prompt_token: str) -> str:
  """The word an expert binds the subject to: the prompts' rare identifier (bind=token, DreamBooth), or nothing
  (bind=class_noun: the class noun itself, "a starfish on the beach"). An expert is thrown away once it has
  rendered its cluster's prompts, so binding the class noun costs nothing, and it keeps every prompt in the base
  model's own vocabulary: a small text encoder that never saw the rare token places it in no context."""
  return prompt_token if experts_cfg.get("bind", "token") == "token" else ""


def render_prompt(prompt: str, prompt_token: str, token: str) -> str:
  """A prompt written with `prompt_token` ("a sks ball on the beach") as the expert that binds `token` reads it
  ("a ball on the beach" when token is empty)."""
  if not prompt_token.strip() or prompt_token == token:
    return prompt
  replaced = re.sub(rf"(?<!\w){re.escape(prompt_token.strip())}(?!\w)", token, prompt)
  return " ".join(replaced.split())


def expert_train_config(base_cfg: mlc.ConfigDict, experts_cfg: mlc.ConfigDict) -> mlc.ConfigDict:
  """The base run's config with the expert's optimisation settings (no EMA, no accumulation)."""
  cfg = copy.deepcopy(base_cfg)
  with cfg.unlocked():
    cfg.train.steps = int(experts_cfg.steps)
    cfg.train.lr = float(experts_cfg.lr)
    cfg.train.optimizer = experts_cfg.optimizer
    cfg.train.lr_schedule = "constant"
    cfg.train.warmup_steps = int(experts_cfg.warmup_steps)
    cfg.train.weight_decay = 0.0
    cfg.train.ema_decay = 0.0
    cfg.train.grad_accum_steps = 1
    cfg.train.seed = int(experts_cfg.seed)
    cfg.diffusion.p_drop_text = float(experts_cfg.p_drop_text)
    cfg.diffusion.p_drop_neighbors = cfg.diffusion.p_drop_both = 0.0
  return cfg


def lora_spec(experts_cfg: mlc.ConfigDict, unet) -> lora_lib.LoRASpec:
  return lora_lib.spec_from_config(experts_cfg.lora, len(unet.down_blocks), len(unet.up_blocks),
                                   blockwise=experts_cfg.method == "blockwise_lora")


def instance_prompt_from_caption(caption: str, noun: str, token: str, fallback: str) -> str:
  """The image's caption with the noun phrase that names the subject replaced by "<token> <noun>", so the expert
  binds the token to the subject and keeps the caption's context words for the context ("a picture of a green
  starfish in the snow" -> "a picture of a sks starfish in the snow"); `fallback` when the caption does not name
  the noun ("IMG_0042", "a photo of a toy")."""
  words = caption.split()
  plain = [re.sub(r"[^a-z]", "", w.lower()) for w in words]
  if noun.lower() not in plain:
    return fallback
  end = plain.index(noun.lower())
  start = end
  while start > 0 and plain[start - 1] not in ("a", "an", "the"):
    start -= 1
  if start == 0 and plain[0] not in ("a", "an", "the"):
    start = end  # no article before the noun: replace the noun alone
  return " ".join(words[:start] + [w for w in (token, noun) if w] + words[end + 1:])


def prepare_images(images: list[np.ndarray], size: int) -> np.ndarray:
  """uint8 images of any size -> float32 [N, size, size, 3] in [-1, 1], as the trainer's loader makes them."""
  if not images:
    raise ValueError("an expert needs at least one image")
  return np.stack([to_model_range(resize_and_crop(np.asarray(i, np.uint8), size)) for i in images])


class ExpertTrainer:
  """Trains experts of one base model with one compiled step (see the module docstring)."""

  def __init__(self, base_cfg: mlc.ConfigDict, base_weights: dict, experts_cfg: mlc.ConfigDict):
    check_settings(experts_cfg)
    if int(base_cfg.model.num_neighbors) != 0:
      raise ValueError("experts fine-tune a base text-to-image model, got an apprentice (model.num_neighbors > 0)")
    self.settings = experts_cfg
    self.cfg = expert_train_config(base_cfg, experts_cfg)
    self.method = experts_cfg.method
    self.image_size = output_size(base_cfg)  # pixels; a latent base's step encodes them
    self.base_weights = {k: np.asarray(v) for k, v in flatten_dict(base_weights).items()}
    model = SuTIModel(self.cfg, rngs=nnx.Rngs(0))
    load_weights(model, base_weights, source="experts.base_checkpoint")
    self.lora_alpha = 0.0
    self.adapted_layers: dict[str, int] = {}
    if self.method == "full":
      trainable = nnx.All(nnx.Param, nnx.PathContains("unet"))
    else:
      spec = lora_spec(experts_cfg, model.unet)
      self.adapted_layers = lora_lib.add_lora(model.unet, spec, rngs=nnx.Rngs(int(experts_cfg.seed)))
      self.lora_alpha = spec.alpha
      trainable = nnx.LoRAParam
    self.graphdef, params, self.frozen = nnx.split(model, trainable, ...)
    self._template = params
    self.tx, lr = make_optimizer(self.cfg.train)
    null_ids, null_mask = null_text(model, 1)
    self._tokenize = model.tokenize
    step = make_train_step(self.graphdef, self.tx, make_schedule(self.cfg.diffusion), self.cfg,
                           jnp.asarray(null_ids), jnp.asarray(null_mask), lr)
    self._step = jax.jit(step, donate_argnums=0)
    self._init = jax.jit(lambda p, f: init_train_state(p, f, self.tx, self.cfg))

  def fresh_params(self, seed: int):
    """Trainable arrays at the start of an expert: the base UNet (full), or new A (N(0, 1/fan_in)) and zero B."""
    rng = np.random.default_rng(seed)

    def init(path, leaf):
      if self.method == "full":
        return jnp.array(leaf)
      shape = leaf.shape
      if "lora_b" in jax.tree_util.keystr(path):
        return jnp.zeros(shape, leaf.dtype)
      fan_in = int(np.prod(shape[:-1]))
      return jnp.asarray(rng.standard_normal(shape, np.float32) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(init, self._template)

  def batches(self, instance: np.ndarray, class_images: np.ndarray | None, noun: str, token: str,
              rng: np.random.Generator, captions: list[str] | None = None):
    """An endless stream of batches: `batch_size` instance images (+ as many class images with prior weight).
    With `captions` (one per instance image) each image trains with its own prompt (instance_prompt_from_caption)."""
    s = self.settings
    bs = int(s.batch_size)
    fixed = " ".join(s.instance_prompt.format(token=token, noun=noun).split())  # an empty token leaves no gap
    prompts = [instance_prompt_from_caption(c, noun, token, fixed) for c in captions] if captions else [fixed]
    if captions and len(captions) != len(instance):
      raise ValueError(f"{len(instance)} instance images but {len(captions)} captions")
    instance_ids, instance_mask = (np.asarray(a) for a in self._tokenize(prompts))
    weights = [1.0] * bs
    use_prior = class_images is not None and len(class_images) > 0 and float(s.prior_weight) > 0
    class_ids = class_mask = None
    if use_prior:
      class_ids, class_mask = (np.asarray(a) for a in self._tokenize([s.class_prompt.format(noun=noun)] * bs))
      # mean(w * l) over 2*bs rows = mean(instance) + lambda * mean(class)
      weights = [2.0] * bs + [2.0 * float(s.prior_weight)] * bs
    weights = jnp.asarray(weights, jnp.float32)
    while True:
      picked = rng.integers(0, len(instance), bs)
      images = instance[picked]
      rows = picked if captions else np.zeros(bs, int)
      ids, mask = instance_ids[rows], instance_mask[rows]
      if use_prior:
        images = np.concatenate([images, class_images[rng.integers(0, len(class_images), bs)]])
        ids, mask = np.concatenate([ids, class_ids]), np.concatenate([mask, class_mask])
      yield {"images": jnp.asarray(images), "ids": jnp.asarray(ids), "text_mask": jnp.asarray(mask),
             "loss_weight": weights}

  def train(self, images: list[np.ndarray], noun: str, token: str, *, class_images: np.ndarray | None = None,
            seed: int = 0, progress=None, captions: list[str] | None = None) -> TrainedExpert:
    """Fine-tunes one expert on `images` (uint8, any size); class_images are float32 [N, S, S, 3] in [-1, 1];
    captions (one per image) give each image its own instance prompt (instance_prompt_from_caption)."""
    start = time.perf_counter()
    instance = prepare_images(images, self.image_size)
    state = self._init(self.fresh_params(seed), self.frozen)
    state = state.replace(rng=jax.random.key_data(jax.random.key(seed)))
    stream = self.batches(instance, class_images, noun, token, np.random.default_rng(seed), captions)
    losses = []
    for _ in range(int(self.settings.steps)):
      state, metrics = self._step(state, next(stream), step_rng(state))
      losses.append(metrics["loss"])
      if progress is not None:
        progress.update(1)
    losses = [float(x) for x in jax.device_get(losses)]
    if not np.all(np.isfinite(losses)):
      raise FloatingPointError(f"expert training hit a non-finite loss at step {int(np.argmin(np.isfinite(losses)))}")
    weights = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
               for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state.params))[0]}
    return TrainedExpert(self.method, weights, self.lora_alpha, losses, time.perf_counter() - start)

  def merged_weights(self, expert: TrainedExpert) -> dict[str, np.ndarray]:
    """The full model's flat weights with the expert applied (LoRA merged into the base kernels)."""
    if expert.method == "full":
      merged = dict(self.base_weights)
      for name, value in expert.weights.items():
        if name not in merged:
          raise ValueError(f"expert weight {name} has no place in the base model")
        merged[name] = value
      return merged
    return lora_lib.merge_lora(self.base_weights, expert.weights, expert.lora_alpha)
