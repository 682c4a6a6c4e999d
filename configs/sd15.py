"""Stable Diffusion 1.5 (UNet 859,520,964 parameters with neighbors off): the full-scale latent recipe.

Latent space (4 channels at 64x64 for 512 px images) with CLIP ViT-L/14 text (768 wide, 77 tokens, unmasked as SD
runs it) and SD's AutoencoderKL (83,653,863 parameters, frozen); the sampling settings follow SD 1.5's DDIM
scheduler config. With a local diffusers folder everything comes from it (UNet, VAE, CLIP and tokenizer, scheduler):

  suti convert diffusers --src /models/stable-diffusion-v1-5 --out /ckpt/sd15       # one checkpoint
  suti generate --checkpoint /ckpt/sd15 --prompt "a photo of a dog on the beach" --out dog.png
  # experts: DreamBooth LoRA with prior preservation on the converted base -> ICL shards
  suti data run --config configs/pipeline/sd15_icl.py --input '/data/web/*.tar' --output /data/icl_sd15 \
      --config.experts.base_checkpoint=/ckpt/sd15 --runner ray
  # the apprentice: --config.model.pretrained converts the folder once into <workdir>/pretrained and starts there
  suti train --config configs/sd15.py --workdir /data/runs/sd15_suti --config.model.num_neighbors=3 \
      --config.model.pretrained=/models/stable-diffusion-v1-5 --config.data.shards='/data/icl_sd15/icl/*.tar'
  suti export --format diffusers --checkpoint /ckpt/sd15 --out /models/sd15_roundtrip   # back to diffusers

  suti info --config configs/sd15.py
  suti info --config configs/sd15.py --config.model.num_neighbors=3   # the apprentice on top of it
  # GPUs: one node (all local GPUs), or SLURM nodes joined by jax.distributed (launch/README.md)
  CONFIG=configs/sd15.py WORKDIR=/data/runs/sd15 bash launch/gpu_single_node.sh --config.model.dtype=bfloat16
  CONFIG=configs/sd15.py WORKDIR=/shared/runs/sd15 sbatch --nodes=4 launch/slurm_multinode.sbatch
"""
import ml_collections as mlc

from configs import toy


def get_config() -> mlc.ConfigDict:
  c = toy.get_config()
  m = c.model
  m.image_size = 64
  m.in_channels = 4
  m.out_channels = 4
  m.block_out_channels = (320, 640, 1280, 1280)
  m.layers_per_block = 2
  m.down_block_types = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  m.up_block_types = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  m.num_attention_heads = 8
  m.cross_attention_dim = 768
  m.norm_num_groups = 32
  m.resnet_time_scale_shift = "default"  # SD adds the time embedding (a scale-shift model differs in shape)
  m.use_linear_projection = False
  m.text_in_time_embedding = False
  m.neighbor_token_resolutions = (8,)
  m.neighbor_attn_resolutions = (8, 16)

  c.vae.enabled = True
  c.vae.block_out_channels = (128, 256, 512, 512)
  c.vae.layers_per_block = 2
  c.vae.sample_size = 512

  c.text.kind = "clip"
  c.text.checkpoint = ""  # e.g. /models/stable-diffusion-v1-5/text_encoder (local folder)
  c.text.max_length = 77
  c.text.width = 768
  c.text.trainable = False
  c.text.mask_padding = False  # SD runs CLIP on all 77 positions, padding included, and the UNet attends to all

  c.diffusion.schedule = "scaled_linear"  # SD: linear in sqrt(beta)
  c.diffusion.beta_start = 0.00085
  c.diffusion.beta_end = 0.012
  c.diffusion.timestep_spacing = "leading"  # SD 1.5's DDIM scheduler config: leading + 1, last alpha alphas_cumprod[0]
  c.diffusion.steps_offset = 1
  c.diffusion.set_alpha_to_one = False
  c.sample.dynamic_threshold = 0.0  # latent model: no pixel thresholding
  c.sample.text_scale = 7.5

  c.train.batch_size = 256
  c.train.lr = 1e-5
  c.train.ema_decay = 0.9999
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.diffusion.prediction = "eps"  # Stable Diffusion 1.5 predicts eps: converted weights need it
  return c
