"""The whole toy data chain, raw web shards -> ICL shards: the toy pipeline plus DreamBooth experts and targets.

  suti data toyweb --out /tmp/toyweb --pages 300 --seed 0
  suti train --config configs/toy.py --workdir /tmp/toy_base --config.data.shards='/tmp/toyweb/*.tar'
  suti data run --config configs/pipeline/toy_icl.py --input /tmp/toyweb --output /tmp/toy_icl \
      --config.experts.base_checkpoint=/tmp/toy_base [--runner ray]
  suti data calibrate-targets --config configs/pipeline/toy_icl.py --output /tmp/toy_icl
  suti train --config configs/toy_suti.py --workdir /tmp/toy_suti --config.data.shards='/tmp/toy_icl/icl/*.tar' \
      --config.train.init_from=/tmp/toy_base

One expert per cluster (experts.method: full | lora | blockwise_lora) renders the cluster's prompts; renders that
pass targets.filter become ICL examples under /tmp/toy_icl/icl/ (validation clusters under icl/val/). Changing only
targets.filter on the same --output re-filters without retraining or re-rendering. SuTI's experts at full scale:
500 Adafactor steps at lr 1e-5 (`--config.experts.optimizer=adafactor --config.experts.steps=500
--config.experts.lr=1e-5`); the toy base was trained at lr 5e-4 and needs a larger step to move in 200 steps.
On Ray (`--runner ray`) each expert is a task with runner.accelerator_* resources, retried runner.max_retries times.
"""
import ml_collections as mlc

from configs.pipeline import toy


def get_config() -> mlc.ConfigDict:
  c = toy.get_config()
  c.stages = tuple(c.stages) + ("experts", "targets")

  c.experts = mlc.ConfigDict()
  c.experts.base_checkpoint = "checkpoints/toy_base"  # a `suti train` workdir (or checkpoint) of a base model
  c.experts.method = "full"  # full | lora | blockwise_lora
  c.experts.steps = 200
  c.experts.lr = 2e-4
  c.experts.optimizer = "adamw"  # adamw | adafactor
  c.experts.warmup_steps = 0
  c.experts.batch_size = 4  # instance images per step (plus as many class images with prior preservation)
  # How the toy experts bind the subject (measured on the shipped toy base, docs in README "Experts"): with
  # DreamBooth's rare token ("a sks ball", prior preservation) the experts learned the subject but lost the
  # contexts ("a sks ball on the beach" came out on a pale background for 4 of 5 backgrounds), at lr 5e-5 .. 2e-4,
  # 100 .. 200 steps, full or LoRA: the toy's byte-level text encoder never saw "sks" and places it in no
  # context. Binding the class noun itself (the expert is thrown away after rendering, so its drift costs
  # nothing) with each image's caption as its prompt ("a picture of a starfish with purple dots in the snow")
  # rendered every background asked for. web_icl.py keeps DreamBooth's token and prior preservation.
  c.experts.bind = "class_noun"  # token (DreamBooth's rare identifier) | class_noun
  c.experts.caption_prompts = True  # each instance image trains with its caption, subject phrase -> token + noun
  c.experts.prior_weight = 0.0  # lambda of class-prior preservation; 0 turns it off (required by bind=class_noun)
  c.experts.num_class_images = 16  # base-model renders of the class prompt, per class noun
  c.experts.instance_prompt = "a {token} {noun}"
  c.experts.class_prompt = "a {noun}"
  c.experts.p_drop_text = 0.0  # DreamBooth trains without caption dropout
  c.experts.seed = 0
  c.experts.lora = mlc.ConfigDict()
  c.experts.lora.rank = 4  # method=lora: this rank in every block
  c.experts.lora.alpha = 4.0  # the update is scaled by alpha / rank
  c.experts.lora.conv = True  # also adapt ResNet and sampler convolutions (the toy's outer blocks have no attention)
  # method=blockwise_lora: a rank per block (one per down block, the mid block, one per up block); 0 skips a block.
  c.experts.lora.down_ranks = (4, 0, 0)
  c.experts.lora.mid_rank = 0
  c.experts.lora.up_ranks = (0, 0, 4)

  c.targets = mlc.ConfigDict()
  c.targets.seeds_per_prompt = 2
  c.targets.steps = 25  # sampler steps of the expert renders (the base config's sampler and guidance)
  c.targets.text_scale = 3.0
  c.targets.render_batch_size = 16
  c.targets.seed = 0
  c.targets.max_neighbors = 5  # real images stored per example (the trainer samples K of them)
  c.targets.val_percent = 10.0  # clusters (by a hash of their id) written to icl/val/
  c.targets.filter = mlc.ConfigDict()  # thresholds of the toy CLIP: set from `suti data calibrate-targets`
  c.targets.filter.clip_i_threshold = 0.85
  c.targets.filter.clip_t_threshold = 0.2
  c.targets.filter.blank_std_threshold = 2.0
  c.targets.filter.near_copy_clip_threshold = 0.995
  c.targets.filter.near_copy_pixel_threshold = 2.0
  return c
