"""The toy CLIP: a tiny open_clip model trained on toy-world pairs, loaded like any open_clip model.

The architecture is an open_clip model config ("toy-ViT-32": a ViT on 32x32 images with 8x8
patches and a small text transformer over open_clip's own BPE vocabulary, which ships with the
package) registered with `open_clip.add_model_config`. The weights load through
`open_clip.create_model_and_transforms(name, pretrained=<local file>)`, exactly as a full-scale
run loads ViT-L/14 from a local file: `load_clip("ViT-L-14", "/models/vit_l14.safetensors")` and
`load_clip("toy-ViT-32", "checkpoints/toy_clip")` take the same path.

Training (`python -m suti.toy.clip_training --out checkpoints/toy_clip --steps N`, also
`suti data train-clip`): image / caption pairs rendered from train-split subjects, open_clip's
ClipLoss between images and captions plus a weighted ClipLoss between two views of the same
subject in different contexts (so that image embeddings carry identity, not only the scene),
AdamW, torch on CPU. Evaluation uses held-out subjects only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Sequence

import numpy as np
from tqdm import tqdm

from suti.core.errors import run_parsed_command
from suti.embed.clip import (
  CHECKPOINT_FILE,
  CONFIG_DIR,
  TOY_MODEL_NAME,
  _preprocess_cfg,
  encode_images,
  encode_texts,
  images_to_tensor,
  register_toy_configs,
)
from suti.toy import world as tw

# ----------------------------------------------------------------------------------------------
# Training data: toy pairs rendered on the fly.

@dataclasses.dataclass
class ToyPairs:
  """A pool of subjects, each rendered in `views` different contexts; captions are drawn per
  batch. images[i, v] shows subjects[i] in contexts[i][v]."""
  images: np.ndarray  # uint8 [N, V, 32, 32, 3]
  subjects: list[tw.Subject]
  contexts: list[list[tw.Context]]


def _to_size(img: np.ndarray, out_size: int) -> np.ndarray:
  """Nearest-neighbour up, mean-pool down (sizes are powers of two)."""
  size = img.shape[0]
  if size < out_size:
    return np.repeat(np.repeat(img, out_size // size, 0), out_size // size, 1)
  if size > out_size:
    f = size // out_size
    return img.reshape(out_size, f, out_size, f, 3).mean((1, 3)).round().astype(np.uint8)
  return img


def render_pairs(subjects: Sequence[tw.Subject], n: int, seed: int, views: int = 2,
                 sizes: Sequence[int] = (16, 32), out_size: int = 32) -> ToyPairs:
  """`n` random subjects from `subjects`, each rendered `views` times in random contexts (all
  styles and accessories) at random sizes, brought to `out_size`."""
  rng = np.random.default_rng(seed)
  images = np.zeros((n, views, out_size, out_size, 3), np.uint8)
  chosen, contexts = [], []
  for i in range(n):
    subject = subjects[int(rng.integers(len(subjects)))]
    ctx = [tw.sample_context(rng, style_p=0.3, accessory_p=0.3) for _ in range(views)]
    for v, c in enumerate(ctx):
      images[i, v] = _to_size(tw.render(subject, c, int(rng.choice(sizes))), out_size)
    chosen.append(subject)
    contexts.append(ctx)
  return ToyPairs(images, chosen, contexts)


def caption_for(subject: tw.Subject, context: tw.Context, rng: np.random.Generator) -> str:
  """Mostly a full description; sometimes a class-only prompt, so prompts score sensibly too."""
  if rng.random() < 0.25:
    return tw.prompt_for(subject.cls, context)
  return tw.describe(subject, context, rng=rng)


# ----------------------------------------------------------------------------------------------
# Evaluation on held-out subjects.

def evaluate(model, tokenizer, seed: int = 1, num_queries: int = 400, num_candidates: int = 10
             ) -> dict[str, float]:
  """Held-out figures (subjects never seen in training):
  - image_to_text_top1: the true caption ranks first among `num_candidates` captions of other
    held-out pairs (chance 1 / num_candidates);
  - identity_text_top1: the true caption ranks first among captions of `num_candidates` different
    subjects in the *same* context (identity from the image alone);
  - identity_image_top1: another image of the same subject, in another context, ranks first
    among it and `num_candidates - 1` images of other subjects (what clustering and CLIP-I need);
  - same_subject_cosine / different_subject_cosine: mean image-image cosine.
  """
  rng = np.random.default_rng(seed)
  heldout = tw.subjects_of_split("heldout")
  m = num_candidates
  queries = [heldout[int(i)] for i in rng.integers(len(heldout), size=num_queries)]
  contexts = [tw.sample_context(rng) for _ in queries]
  images = np.stack([tw.render(s, c, 32) for s, c in zip(queries, contexts)])
  captions = [tw.describe(s, c) for s, c in zip(queries, contexts)]
  img = encode_images(model, images)
  txt = encode_texts(model, tokenizer, captions)

  hits = 0
  for q in range(num_queries):  # random distractor captions
    others = rng.choice(np.delete(np.arange(num_queries), q), m - 1, replace=False)
    scores = txt[np.concatenate([[q], others])] @ img[q]
    hits += int(np.argmax(scores) == 0)
  image_to_text = hits / num_queries

  cand_captions = []
  for s, c, caption in zip(queries, contexts, captions):  # same context, other subjects
    distractors: list[tw.Subject] = []
    while len(distractors) < m - 1:
      d = heldout[int(rng.integers(len(heldout)))]
      if d != s and d not in distractors:
        distractors.append(d)
    cand_captions += [caption] + [tw.describe(d, c) for d in distractors]
  cand = encode_texts(model, tokenizer, cand_captions).reshape(num_queries, m, -1)
  identity_text = float(np.mean(np.argmax(np.einsum("qmd,qd->qm", cand, img), 1) == 0))

  # A second view of each query subject in a new context, and other subjects as distractors.
  second_ctx = [tw.sample_context(rng) for _ in queries]
  second = encode_images(model, np.stack([tw.render(s, c, 32) for s, c in zip(queries, second_ctx)]))
  hits, same, diff = 0, [], []
  for q in range(num_queries):
    others = [o for o in rng.permutation(num_queries) if queries[o] != queries[q]][:m - 1]
    scores = np.concatenate([[second[q] @ img[q]], second[others] @ img[q]])
    hits += int(np.argmax(scores) == 0)
    same.append(scores[0])
    diff.extend(scores[1:])
  return {"image_to_text_top1": image_to_text, "identity_text_top1": identity_text,
          "identity_image_top1": hits / num_queries, "num_candidates": m,
          "chance": 1.0 / m, "same_subject_cosine": float(np.mean(same)),
          "different_subject_cosine": float(np.mean(diff)), "num_queries": num_queries}


# ----------------------------------------------------------------------------------------------
# Training.

def train(out_dir: str, steps: int, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
          pool_size: int = 12000, threads: int = 1, progress: bool = True,
          model_name: str = TOY_MODEL_NAME, eval_queries: int = 400,
          image_loss_weight: float = 0.5) -> dict:
  """Train the toy CLIP and save it under `out_dir`; returns the training summary + held-out eval."""
  import open_clip  # lazy: torch only to train the toy CLIP
  import torch  # lazy: torch only to train the toy CLIP
  from safetensors.torch import save_file  # lazy: torch only to train the toy CLIP
  if steps < 1 or batch_size < 2:
    raise ValueError("steps must be >= 1 and batch size >= 2")
  if pool_size // 2 < batch_size:
    raise ValueError(f"pool size {pool_size} too small for batch size {batch_size} "
                     "(it holds pool_size // 2 subjects with 2 views each)")
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  register_toy_configs()
  model, _, _ = open_clip.create_model_and_transforms(model_name)
  tokenizer = open_clip.get_tokenizer(model_name)
  model.train()

  t0 = time.time()
  pool = render_pairs(tw.subjects_of_split("train"), pool_size // 2, seed, views=2)
  pool_x = images_to_tensor(model, pool.images.reshape(-1, *pool.images.shape[2:]))
  pool_x = pool_x.view(len(pool.subjects), 2, *pool_x.shape[1:])
  render_s = time.time() - t0

  loss_fn = open_clip.loss.ClipLoss()
  decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
  no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                           {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
  warmup = max(1, steps // 20)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
      1 + np.cos(np.pi * min(1.0, s / steps))))
  rng = np.random.default_rng(seed + 1)
  bar = range(steps)
  if progress:
    bar = tqdm(bar, desc="toy CLIP", unit="step")
  losses = []
  t1 = time.time()
  for step in bar:
    idx = rng.choice(len(pool.subjects), batch_size, replace=False)
    which = torch.from_numpy(rng.integers(0, 2, batch_size))
    x = pool_x[idx, which]  # one view is captioned, the other is its image-image positive
    other = pool_x[idx, 1 - which]
    if rng.random() < 0.5:  # a flip keeps identity and context; cheap augmentation
      x, other = x.flip(-1), other.flip(-1)
    texts = [caption_for(pool.subjects[i], pool.contexts[i][int(w)], rng)
             for i, w in zip(idx, which)]
    image_f, text_f, scale = model(x, tokenizer(texts))
    loss = loss_fn(image_f, text_f, scale)
    if image_loss_weight > 0:
      # Image-image contrast across contexts: the same subject elsewhere is the positive, so
      # image embeddings carry identity, not only the scene (what clustering and CLIP-I need).
      other_f = model.encode_image(other, normalize=True)
      loss = loss + image_loss_weight * loss_fn(image_f, other_f, scale)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, np.log(100))
    losses.append(loss.item())
    if progress and step % 20 == 0:
      bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
  train_s = time.time() - t1

  model.eval()
  metrics = evaluate(model, tokenizer, num_queries=eval_queries)
  os.makedirs(out_dir, exist_ok=True)
  # float16 on disk keeps the file small; open_clip's loader casts back to the model's float32.
  state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
  save_file(state, os.path.join(out_dir, CHECKPOINT_FILE))
  with open(os.path.join(CONFIG_DIR, f"{model_name}.json"), encoding="utf-8") as f:
    model_cfg = json.load(f)
  pp = _preprocess_cfg(model)
  with open(os.path.join(out_dir, "open_clip_config.json"), "w", encoding="utf-8") as f:
    json.dump({"model_cfg": model_cfg, "preprocess_cfg": {
        "size": pp["size"], "mean": list(pp["mean"]), "std": list(pp["std"]),
        "interpolation": "bicubic", "resize_mode": "shortest"}}, f, indent=2)
  summary = {"model_name": model_name, "steps": steps, "batch_size": batch_size, "lr": lr,
             "seed": seed, "pool_size": pool_size, "threads": threads,
             "image_loss_weight": image_loss_weight,
             "render_seconds": round(render_s, 1), "train_seconds": round(train_s, 1),
             "final_loss": float(np.mean(losses[-50:])),
             "parameters": int(sum(p.numel() for p in model.parameters())),
             "checkpoint_bytes": os.path.getsize(os.path.join(out_dir, CHECKPOINT_FILE)),
             "heldout_eval": metrics}
  with open(os.path.join(out_dir, "train_summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--out", default="checkpoints/toy_clip",
                      help="output folder (open_clip_model.safetensors + open_clip_config.json)")
  parser.add_argument("--steps", type=int, default=1500, help="optimizer steps")
  parser.add_argument("--batch-size", type=int, default=128, help="pairs per step")
  parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (cosine)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the rendered pool and batches")
  parser.add_argument("--pool-size", type=int, default=12000,
                      help="rendered training images (pool_size / 2 subjects x 2 views)")
  parser.add_argument("--image-loss-weight", type=float, default=0.5,
                      help="weight of the image-image (same subject, other context) ClipLoss")
  parser.add_argument("--threads", type=int, default=1,
                      help="torch CPU threads (1 is fastest for this tiny model on a busy CPU)")


def run(args: argparse.Namespace) -> int:
  s = train(args.out, args.steps, args.batch_size, args.lr, args.seed, args.pool_size,
            args.threads, image_loss_weight=args.image_loss_weight)
  e = s["heldout_eval"]
  print(f"toy CLIP: {s['steps']} steps in {s['train_seconds']:.0f} s, loss {s['final_loss']:.3f}; "
        f"held-out top-1 of {e['num_candidates']} (chance {e['chance']:.2f}): image->text "
        f"{e['image_to_text_top1']:.3f}, identity by text {e['identity_text_top1']:.3f}, "
        f"identity by image {e['identity_image_top1']:.3f}; cosine same subject "
        f"{e['same_subject_cosine']:.3f} vs different {e['different_subject_cosine']:.3f} -> {args.out}")
  return 0


def main(argv: list[str] | None = None) -> int:
  """`python -m suti.toy.clip_training` = `suti data train-clip`."""
  return run_parsed_command("suti data train-clip", add_arguments, run, argv)


if __name__ == "__main__":
  raise SystemExit(main())
