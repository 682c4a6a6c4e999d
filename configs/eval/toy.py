"""Toy-world evaluation: SuTI few-shot against text-only, a DreamBooth expert per subject, and copying a demo.

  suti data toyweb --out /tmp/toyweb --pages 20 --seed 0          # writes /tmp/toyweb/benchmark/ (held-out)
  suti eval --checkpoint checkpoints/toy_suti --benchmark /tmp/toyweb/benchmark --out /tmp/eval \
      [--config configs/eval/toy.py] [--config.eval.images_per_prompt=4]

Per subject the first `eval.num_demos` reference images are the demos; every prompt is sampled
`eval.images_per_prompt` times per method with the same sampler settings. Metrics: CLIP-I / CLIP-T with the toy
CLIP, DINO when `dino.checkpoint` names a local file, and on toy benchmarks identity retrieval (the true subject
ranked first by CLIP-I among `toy.identity_candidates` held-out subjects of its class, each represented by renders
in random contexts) and context accuracy
(zero-shot CLIP picks the prompt's background among all 8). The DreamBooth baseline fine-tunes
`dreambooth.base_checkpoint` on the demos with the data pipeline's expert settings (configs/pipeline/toy_icl.py).
"""
import ml_collections as mlc

from configs.pipeline import toy_icl


def get_config() -> mlc.ConfigDict:
  c = mlc.ConfigDict()
  c.eval = mlc.ConfigDict()
  c.eval.methods = ("suti", "text_only", "dreambooth", "copy")
  c.eval.num_demos = 3
  c.eval.images_per_prompt = 2
  c.eval.max_subjects = 0  # 0: every subject of the benchmark
  c.eval.max_prompts = 0  # 0: every prompt of a subject
  c.eval.seed = 0
  c.eval.batch_size = 25  # rows per sampler call (one compiled program)
  c.eval.report_prompts = 8  # prompts per subject shown in the report's grids
  c.eval.near_copy_pixel_threshold = 2.0  # mean |difference| to a demo (0..255) below which an output is a copy
  c.eval.near_copy_clip_threshold = 0.995

  # Sampler settings of every method (empty / 0: the checkpoint's own config).
  c.sample = mlc.ConfigDict()
  c.sample.sampler = ""
  c.sample.steps = 0
  c.sample.text_scale = -1.0  # < 0: the checkpoint's
  c.sample.neighbor_scale = -1.0
  c.sample.guidance_mode = ""  # joint | interleaved (SuTI's: text or neighbor guidance per step, two rows)
  c.sample.interleave_eta = -1.0  # probability of a text-guidance step in interleaved mode

  c.clip = mlc.ConfigDict()
  c.clip.model_name = "toy-ViT-32"
  c.clip.checkpoint = "checkpoints/toy_clip/open_clip_model.safetensors"
  c.clip.batch_size = 256

  c.dino = mlc.ConfigDict()
  c.dino.model_name = "vit_small_patch16_224.dino"
  c.dino.checkpoint = ""  # a local .safetensors / .pth; empty skips DINO (no toy DINO is shipped)

  c.toy = mlc.ConfigDict()
  c.toy.identity_candidates = 10  # M: the true subject + M-1 held-out subjects of its class; 0 turns it off
  c.toy.distractor_references = 4  # reference renders per candidate (the true subject too), random contexts

  c.dreambooth = toy_icl.get_config().experts  # base_checkpoint, method, steps, lr, prior preservation, LoRA
  return c
