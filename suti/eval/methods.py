"""The methods `suti eval` compares, each a way to turn (a subject's demos, prompts) into images.

  suti        the apprentice, few-shot: demos + prompt, no optimisation;
  text_only   the same apprentice without demos (its text-to-image mode): what text alone can do;
  dreambooth  a DreamBooth expert fine-tuned on the demos from the base model (the data pipeline's expert code
              and settings), then sampled with the same sampler: the per-subject optimisation SuTI replaces;
  copy        a demo, returned as is (cycled): the copy-paste ceiling of subject fidelity, blind to the prompt.
Every method returns images at the apprentice's resolution and the seconds it spent on the subject.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from suti.checkpoint.store import checkpoint_config, load_params
from suti.core.hashing import stable_seed
from suti.core.image_ops import resize_and_crop
from suti.core.paths import resolve_path
from suti.experts.dreambooth import ExpertTrainer, expert_token, prepare_images, render_prompt
from suti.infer.sampler import Sampler
from suti.models.model import output_size

METHODS = ("suti", "text_only", "dreambooth", "copy")


class MethodRunner:
  """Builds each method's model once (compiled samplers, the expert trainer) and runs it per subject."""

  def __init__(self, loaded, eval_cfg, sample_overrides: dict, dreambooth_cfg, methods: Sequence[str]):
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
      raise ValueError(f"unknown eval method(s) {unknown}; known: {', '.join(METHODS)}")
    self.loaded = loaded
    self.size = loaded.image_size
    self.seed = int(eval_cfg.seed)
    self.sampler = Sampler.for_loaded(loaded, batch_size=int(eval_cfg.batch_size), sample_overrides=sample_overrides)
    self.dreambooth_cfg = dreambooth_cfg
    self._expert = None
    self._class_images: dict[str, np.ndarray] = {}
    if "dreambooth" in methods:
      self._expert = self._build_expert(sample_overrides, int(eval_cfg.batch_size))

  def _build_expert(self, sample_overrides: dict, batch_size: int):
    path = resolve_path(self.dreambooth_cfg.base_checkpoint)
    if not path:
      raise ValueError("the dreambooth method needs dreambooth.base_checkpoint (a base text-to-image checkpoint)")
    weights, meta = load_params(path)
    base_cfg = checkpoint_config(meta, f"dreambooth.base_checkpoint {path}")
    if output_size(base_cfg) != self.size:
      raise ValueError(f"dreambooth.base_checkpoint renders {output_size(base_cfg)}px, the apprentice {self.size}px")
    trainer = ExpertTrainer(base_cfg, weights, self.dreambooth_cfg)
    s = self.sampler.sample_cfg
    renderer = Sampler.for_config(base_cfg, batch_size=batch_size, sample_overrides={
        k: s[k] for k in ("sampler", "steps", "text_scale", "dynamic_threshold", "guidance_mode")})
    return trainer, renderer

  def class_images(self, noun: str) -> np.ndarray:
    """The base model's renders of the class prompt (prior preservation), once per class noun."""
    trainer, renderer = self._expert
    if noun not in self._class_images:
      e = self.dreambooth_cfg
      n = int(e.num_class_images) if float(e.prior_weight) > 0 else 0
      images = renderer.render(trainer.base_weights, [e.class_prompt.format(noun=noun)] * n,
                               stable_seed("class", noun, e.seed)) if n else np.zeros((0, self.size, self.size, 3))
      self._class_images[noun] = prepare_images(list(images), trainer.image_size) if n else None
    return self._class_images[noun]

  def run(self, method: str, demos: list[np.ndarray], captions: list[str], prompts: list[str], cls: str,
          token: str, seed: int) -> tuple[np.ndarray, float]:
    """(uint8 [len(prompts), S, S, 3], seconds) of one method for one subject; prompts may repeat (seeds)."""
    start = time.perf_counter()
    if method == "suti":
      images = self.sampler.sample(prompts, seed, demos=[demos] * len(prompts),
                                   demo_captions=[captions] * len(prompts))
    elif method == "text_only":
      images = self.sampler.sample(prompts, seed)
    elif method == "dreambooth":
      trainer, renderer = self._expert
      class_images = self.class_images(cls)
      start = time.perf_counter()  # the class images are shared by all subjects of a class: not counted
      bound = expert_token(self.dreambooth_cfg, token)  # the rare token, or the class noun itself (experts.bind)
      expert = trainer.train(demos, cls, bound, class_images=class_images, seed=seed)
      images = renderer.render(trainer.merged_weights(expert), [render_prompt(p, token, bound) for p in prompts], seed)
    elif method == "copy":
      small = [resize_and_crop(d, self.size) for d in demos]
      images = np.stack([small[i % len(small)] for i in range(len(prompts))])
    else:
      raise ValueError(f"unknown eval method {method!r}")
    return np.asarray(images, np.uint8), time.perf_counter() - start
