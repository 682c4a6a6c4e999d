"""Re-caption cluster images and write new prompts for the five SuTI skills.

Backends (config `captions.backend`):
  template      (default, offline) keeps an informative alt text as the caption and replaces boilerplate
                ("IMG_0042", "click to enlarge") by a class-level caption; prompts come from DreamBench-style
                templates. It does not look at pixels.
  transformers  an image-to-text model (`captions.captioner_path`, a local folder loadable with
                AutoModelForImageTextToText, e.g. a BLIP or ViT-GPT2 captioner) writes the captions, and a
                causal language model (`captions.lm_path`) writes one prompt per skill from an instruction.
                Either path may be empty: that half then uses the template backend.
Prompts name the subject only as "<token> <class noun>" (e.g. "sks ball"). The class noun is the first
word of `captions.class_nouns` found in the cluster's captions, else the head noun of the commonest
informative caption, else "object".
"""
from __future__ import annotations

import collections
import os
import random
import re
from typing import Protocol

import numpy as np
from PIL import Image

from data_pipeline import prompt_templates
from data_pipeline.stages import Stage, StageContext, Task
from data_pipeline.stats import TaskResult
from suti.formats import cluster_shards

_FILE_NAME = re.compile(r"^(img|dsc|dscn|dcim|image|photo|pic|p)?[\s_\-]*\d+(\.(jpe?g|png|gif|webp))?$", re.I)
_WORD = re.compile(r"[a-z]{2,}", re.I)
_PREFIXES = ("a photo of ", "a picture of ", "product shot: ", "a sketch of ", "a black and white photo of ")
_STOP_HEAD = (" with ", " wearing ", " on ", " in ", " at ", " floating ", " under ", " by ", " - ", " | ", ",")


def is_informative(text: str) -> bool:
  """False for alt text that says nothing about the image: empty, file names, boilerplate, one word."""
  t = " ".join(text.strip().lower().split())
  if not t or t in prompt_templates.BOILERPLATE or _FILE_NAME.match(t):
    return False
  if re.match(r"^(photo|image|picture)\s*\d*$", t):
    return False
  return len(_WORD.findall(t)) >= 2


def _head_phrase(caption: str) -> str:
  """"a photo of a small red ball with white stripes on the beach" -> "small red ball"."""
  t = " ".join(caption.lower().split())
  changed = True
  while changed:
    changed = False
    for prefix in _PREFIXES:
      if t.startswith(prefix):
        t, changed = t[len(prefix):], True
  cut = min([i for i in (t.find(s) for s in _STOP_HEAD) if i > 0] or [len(t)])
  words = t[:cut].split()
  if words and words[0] in ("a", "an", "the"):
    words = words[1:]
  return " ".join(words)


def class_noun(captions: list[str], vocabulary: tuple[str, ...] = ()) -> str:
  """The class noun prompts use for this cluster (see module docstring)."""
  informative = [c for c in captions if is_informative(c)]
  if vocabulary:
    counts = collections.Counter(w for c in informative for w in re.findall(r"[a-z]+", c.lower())
                                 if w in vocabulary)
    if counts:
      return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
  heads = collections.Counter(_head_phrase(c) for c in informative)
  heads.pop("", None)
  if heads:
    head = sorted(heads.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    return head.split()[-1]
  return "object"


class CaptionBackend(Protocol):
  name: str

  def captions(self, images: list[np.ndarray], alt_texts: list[str], noun: str) -> list[str]: ...

  def prompts(self, cluster_id: str, subject: str) -> list[dict]: ...


class TemplateBackend:
  """Offline captions (alt text or class-level) and template prompts (see module docstring)."""
  name = "template"

  def __init__(self, prompts_per_skill: int = 2, seed: int = 0):
    if prompts_per_skill < 1:
      raise ValueError(f"captions.prompts_per_skill must be >= 1, got {prompts_per_skill}")
    self.prompts_per_skill = prompts_per_skill
    self.seed = seed

  def captions(self, images: list[np.ndarray], alt_texts: list[str], noun: str) -> list[str]:
    generic = f"a photo of a {noun}"
    return [" ".join(t.split()) if is_informative(t) else generic for t in alt_texts]

  def prompts(self, cluster_id: str, subject: str) -> list[dict]:
    rng = random.Random(f"{self.seed}:{cluster_id}")  # a fixed choice per cluster
    out = []
    for skill in prompt_templates.SKILLS:
      templates = prompt_templates.TEMPLATES[skill]
      for template in rng.sample(templates, min(self.prompts_per_skill, len(templates))):
        out.append({"prompt": template.format(s=subject), "skill": skill})
    return out


def _require_folder(path: str, what: str) -> str:
  if not os.path.isdir(path):
    raise ValueError(f"captions.{what} is not a local model folder: {path!r}")
  return path


class TransformersBackend:
  """Captions from a local image-to-text model, prompts from a local causal LM (greedy decoding)."""
  name = "transformers"

  def __init__(self, captioner_path: str = "", lm_path: str = "", prompts_per_skill: int = 1,
               max_new_tokens: int = 24, seed: int = 0):
    import torch  # lazy: local models only
    from transformers import (  # lazy: local models only
      AutoImageProcessor,
      AutoModelForCausalLM,
      AutoModelForImageTextToText,
      AutoTokenizer,
    )
    self.torch = torch
    self.fallback = TemplateBackend(prompts_per_skill, seed)
    self.prompts_per_skill = prompts_per_skill
    self.max_new_tokens = max_new_tokens
    self.captioner = self.lm = None
    if captioner_path:
      path = _require_folder(captioner_path, "captioner_path")
      self.image_processor = AutoImageProcessor.from_pretrained(path)
      self.caption_tokenizer = AutoTokenizer.from_pretrained(path)
      self.captioner = AutoModelForImageTextToText.from_pretrained(path).eval()
    if lm_path:
      path = _require_folder(lm_path, "lm_path")
      self.lm_tokenizer = AutoTokenizer.from_pretrained(path)
      self.lm = AutoModelForCausalLM.from_pretrained(path).eval()

  def captions(self, images: list[np.ndarray], alt_texts: list[str], noun: str) -> list[str]:
    if self.captioner is None:
      return self.fallback.captions(images, alt_texts, noun)
    pixels = self.image_processor(images=[Image.fromarray(i) for i in images], return_tensors="pt").pixel_values
    with self.torch.no_grad():
      ids = self.captioner.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens, do_sample=False)
    texts = [" ".join(t.split()) for t in self.caption_tokenizer.batch_decode(ids, skip_special_tokens=True)]
    generic = self.fallback.captions(images, alt_texts, noun)
    return [t if t else g for t, g in zip(texts, generic)]

  def _generate(self, instructions: list[str]) -> list[str]:
    """Greedy completions of all instructions in one left-padded batch; first line of each."""
    tok = self.lm_tokenizer
    tok.padding_side = "left"  # a causal LM continues from the right end
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if tok.pad_token_id is None:
      tok.pad_token = tok.eos_token
    encoded = tok([i + "\nPrompt:" for i in instructions], return_tensors="pt", padding=True)
    with self.torch.no_grad():
      ids = self.lm.generate(**encoded, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad)
    out = []
    for row in ids[:, encoded["input_ids"].shape[1]:]:
      lines = [line.strip() for line in tok.decode(row, skip_special_tokens=True).strip().splitlines()]
      lines = [line for line in lines if line]
      out.append(" ".join(lines[0].split()) if lines else "")
    return out

  def prompts(self, cluster_id: str, subject: str) -> list[dict]:
    if self.lm is None:
      return self.fallback.prompts(cluster_id, subject)
    templated = self.fallback.prompts(cluster_id, subject)
    texts = self._generate([prompt_templates.LM_INSTRUCTIONS[s].format(s=subject) for s in prompt_templates.SKILLS])
    out = []
    for skill, text in zip(prompt_templates.SKILLS, texts):
      if not text:  # nothing usable: keep the template prompts for this skill
        out.extend(p for p in templated if p["skill"] == skill)
        continue
      if subject not in text:  # a prompt must name the subject, or the target cannot show it
        text = f"a {subject}, {text}"
      out.append({"prompt": text, "skill": skill})
    return out


def make_backend(config) -> CaptionBackend:
  c = config.captions
  if c.backend == "template":
    return TemplateBackend(c.prompts_per_skill, c.seed)
  if c.backend == "transformers":
    return TransformersBackend(c.captioner_path, c.lm_path, c.prompts_per_skill, c.max_new_tokens, c.seed)
  raise ValueError(f"unknown captions.backend {c.backend!r}; expected 'template' or 'transformers'")


def run(ctx: StageContext, task: Task) -> TaskResult:
  result = TaskResult()
  counts = result.stage("captions")
  in_path = task.bucket_input
  if not os.path.isfile(in_path):
    return result
  cfg = ctx.config.captions
  backend = ctx.resource("caption_backend", lambda: make_backend(ctx.config))
  vocabulary = tuple(cfg.class_nouns)
  records = []
  for record in cluster_shards.read_cluster_shard(in_path):
    counts.in_ += len(record.images)
    alt_texts = list(record.captions)
    noun = class_noun(alt_texts, vocabulary)
    subject = f"{cfg.token} {noun}" if cfg.token else noun
    new_captions = backend.captions(record.images, alt_texts, noun)
    result.counters["captions_rewritten"] += sum(a != c for a, c in zip(alt_texts, new_captions))
    meta = {**record.meta, "alt_texts": alt_texts, "class_noun": noun, "subject_token": cfg.token,
            "captioner": backend.name}
    records.append(cluster_shards.ClusterRecord(
        record.cluster_id, record.page_url, record.images, new_captions, record.source_keys, meta,
        prompts=backend.prompts(record.cluster_id, subject)))
    counts.out += len(record.images)
  result.counters["clusters_out"] += len(records)
  if records:
    cluster_shards.write_cluster_shard(task.bucket_output, records)
  return result


STAGE = Stage("captions", "clusters", "clusters", "clusters", ("captions",), run,
              description="new captions and prompts for five skills; writes <output>/clusters/")
