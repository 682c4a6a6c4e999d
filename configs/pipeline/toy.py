"""Data pipeline on the toy web: URL clusters -> CLIP filter (shipped toy CLIP) -> template prompts.

  suti data toyweb --out /tmp/toyweb --pages 200 --seed 0
  suti data calibrate --config configs/pipeline/toy.py --input /tmp/toyweb
  suti data run --config configs/pipeline/toy.py --input /tmp/toyweb --output /tmp/toy_pipeline [--runner ray]

Clusters land in /tmp/toy_pipeline/clusters/, counts in /tmp/toy_pipeline/stats.json. The CLIP thresholds
belong to the toy CLIP (set from `suti data calibrate`); a full-scale config sets clip.model_name /
clip.checkpoint to e.g. ViT-L-14 and a local open_clip_model.safetensors, and recalibrates.
"""
import ml_collections as mlc

TOY_CLASSES = ("ball", "box", "tent", "starfish", "donut", "kite", "egg", "heart")  # toy_world.SHAPES


def get_config() -> mlc.ConfigDict:
  c = mlc.ConfigDict()
  c.stages = ("cluster_map", "cluster_reduce", "clip_filter", "captions")

  c.cluster = mlc.ConfigDict()
  c.cluster.num_buckets = 8  # shuffle width: one bucket's samples are in memory at a time
  c.cluster.min_size = 3  # SuTI needs 3 demonstrations
  c.cluster.max_size = 16  # bigger page groups are site-wide assets, not one subject

  c.clip = mlc.ConfigDict()
  c.clip.model_name = "toy-ViT-32"
  c.clip.checkpoint = "checkpoints/toy_clip/open_clip_model.safetensors"
  c.clip.batch_size = 256
  c.clip.near_dup_threshold = 0.99
  c.clip.outlier_threshold = 0.82
  c.clip.cluster_threshold = 0.82
  c.clip.max_outlier_fraction = 0.5

  c.captions = mlc.ConfigDict()
  c.captions.backend = "template"  # template | transformers
  c.captions.captioner_path = ""  # local image-to-text model folder (transformers backend)
  c.captions.lm_path = ""  # local causal LM folder (transformers backend)
  c.captions.token = "sks"
  c.captions.class_nouns = TOY_CLASSES
  c.captions.prompts_per_skill = 2
  c.captions.max_new_tokens = 24
  c.captions.seed = 0

  c.runner = mlc.ConfigDict()
  c.runner.workers = 0  # local: 0 = in this process; N = N worker processes. Ray: actors (0 -> 2)
  c.runner.ray_address = ""  # "" = local ray.init(num_cpus=2); else a cluster address ("auto", "ray://...")
  c.runner.ray_num_cpus = 2
  c.runner.max_retries = 2  # a failing task is retried this often (local: in process; Ray: by Ray) before it fails
  # Accelerator stages (experts) on Ray: one remote task per expert with these resources.
  c.runner.accelerator_num_cpus = 1.0
  c.runner.accelerator_num_gpus = 0.0  # e.g. 1.0 on a GPU cluster
  c.runner.accelerator_resources = {}  # custom Ray resources, e.g. {"TPU": 1} on TPU hosts
  c.runner.accelerator_max_calls = 0  # tasks per worker process before it restarts; 0 = unlimited (model kept)

  c.calibrate = mlc.ConfigDict()
  c.calibrate.max_samples = 2000
  c.calibrate.random_pairs = 5000
  c.calibrate.seed = 0
  return c
