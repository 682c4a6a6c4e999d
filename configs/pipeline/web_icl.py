"""Full scale, web pairs -> ICL shards: ViT-L/14 CLIP filter, SuTI-style DreamBooth experts on GPUs or TPUs.

  suti data calibrate --config configs/pipeline/web_icl.py --input '/data/web/{00000..09999}.tar'
  suti data run --config configs/pipeline/web_icl.py --input '/data/web/*.tar' --output /data/icl --runner ray \\
      --config.runner.ray_address=auto --config.experts.base_checkpoint=/ckpt/imagen64_base \\
      --config.clip.checkpoint=/models/ViT-L-14/open_clip_model.safetensors
  suti data calibrate-targets --config configs/pipeline/web_icl.py --output /data/icl

Every path is local (or a shared file system every Ray node sees): nothing is downloaded. Experts follow SuTI
(500 Adafactor steps at lr 1e-5, full fine-tuning, prior preservation with 200 class images per noun, as
DreamBooth); each is one Ray task on one accelerator (runner.accelerator_num_gpus, or
`--config.runner.accelerator_resources="{'TPU': 1}"` on TPU hosts), retried runner.max_retries times. The
CLIP and target thresholds below are placeholders: they belong to one CLIP model and one base model, so set
them from `suti data calibrate` and `suti data calibrate-targets` before a long run.
"""
import ml_collections as mlc

from configs.pipeline import toy_icl


def get_config() -> mlc.ConfigDict:
  c = toy_icl.get_config()
  c.cluster.num_buckets = 1024
  c.clip.model_name = "ViT-L-14"
  c.clip.checkpoint = ""  # a local open_clip_model.safetensors of ViT-L-14
  c.clip.batch_size = 512
  c.captions.class_nouns = ()  # the class noun comes from the captions' head nouns
  c.captions.prompts_per_skill = 4

  c.experts.base_checkpoint = ""  # a `suti train` workdir of the base model (e.g. configs/imagen64.py)
  c.experts.method = "full"
  c.experts.bind = "token"  # DreamBooth's rare identifier, with class-prior preservation
  c.experts.caption_prompts = False
  c.experts.prior_weight = 1.0
  c.experts.steps = 500
  c.experts.lr = 1e-5
  c.experts.optimizer = "adafactor"
  c.experts.batch_size = 4
  c.experts.num_class_images = 200
  c.experts.lora.rank = 16
  c.experts.lora.alpha = 16.0
  c.experts.lora.conv = False
  c.experts.lora.down_ranks = (16, 0, 0, 0)  # block-wise LoRA on the outermost blocks (arXiv 2403.07500)
  c.experts.lora.mid_rank = 0
  c.experts.lora.up_ranks = (0, 0, 0, 16)

  c.targets.seeds_per_prompt = 4
  c.targets.steps = 50
  c.targets.text_scale = 7.5
  c.targets.render_batch_size = 16
  c.targets.max_neighbors = 8
  c.targets.val_percent = 1.0

  c.runner.workers = 16
  c.runner.accelerator_num_cpus = 4.0
  c.runner.accelerator_num_gpus = 1.0
  c.runner.accelerator_max_calls = 0  # keep the base model and the compiled step between experts
  return c
