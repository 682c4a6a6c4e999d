"""Web pairs -> ICL shards with Stable Diffusion 1.5 experts: DreamBooth LoRA with prior preservation, as diffusers'
DreamBooth LoRA recipe trains it (rank 4 on every attention projection, AdamW at lr 1e-4, 500 steps, batch 4
instance + 4 class images, prior weight 1.0, 200 class images per noun rendered by the base, 512 px).

  suti convert diffusers --src /models/stable-diffusion-v1-5 --out /ckpt/sd15
  suti data run --config configs/pipeline/sd15_icl.py --input '/data/web/*.tar' --output /data/icl_sd15 \\
      --runner ray --config.runner.ray_address=auto --config.experts.base_checkpoint=/ckpt/sd15 \\
      --config.clip.checkpoint=/models/ViT-L-14/open_clip_model.safetensors
  suti train --config configs/sd15.py --workdir /data/runs/sd15_suti --config.model.num_neighbors=3 \\
      --config.model.pretrained=/models/stable-diffusion-v1-5 --config.data.shards='/data/icl_sd15/icl/*.tar'

Everything else (CLIP filter, captions, targets, the Ray runner) is configs/pipeline/web_icl.py's; calibrate its
thresholds for this base with `suti data calibrate-targets` before a long run.
"""
import ml_collections as mlc

from configs.pipeline import web_icl


def get_config() -> mlc.ConfigDict:
  c = web_icl.get_config()
  c.experts.method = "lora"
  c.experts.optimizer = "adamw"
  c.experts.lr = 1e-4
  c.experts.steps = 500
  c.experts.batch_size = 4
  c.experts.prior_weight = 1.0
  c.experts.num_class_images = 200
  c.experts.lora.rank = 4
  c.experts.lora.alpha = 4.0
  c.experts.lora.conv = False  # attention projections only, as diffusers' recipe
  c.targets.text_scale = 7.5
  c.targets.steps = 50
  return c
