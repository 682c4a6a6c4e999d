"""Training input: an infinite, deterministic, resumable stream of host-local batches from webdataset shards.

Two kinds of shards (the formats suti.formats writes):
  "pairs": image-text pairs as img2dataset writes them (KEY.jpg|png|webp, KEY.txt, KEY.json with "caption");
  "icl":   SuTI examples, key `<cluster>_<n>`: target.png, target.txt, neighbor_i.png, neighbor_i.txt, meta.json.

The stream of one host, epoch after epoch:
  shards sorted, permuted by rng(seed, epoch); this host takes perm[process_index::process_count]
  -> raw samples (undecoded bytes, read by suti.core.tar_io from local files or remote streams, damage counted)
  -> a shuffle buffer driven by rng(seed, epoch, process_index)
  -> decode + resize + crop (bad samples counted by reason and skipped) -> batches.

Its position is (epoch, raw samples drawn from that epoch's shuffled stream). Everything above is a function
of the seed and the position, so resuming rebuilds the epoch's stream, drops the first `consumed` raw samples
without decoding them, and yields exactly the batches the uninterrupted stream would have yielded.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import queue
import re
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

import braceexpand
import numpy as np

from suti.core.image_ops import resize_and_crop, to_model_range
from suti.core.safe_image import ImageRejected, decode_image
from suti.core.shards import TAR_SUFFIXES, list_shards
from suti.core.tar_io import iter_tar_samples
from suti.models.neighbors import pad_neighbors

KINDS = ("pairs", "icl")
IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp")
_NEIGHBOR_IMAGE = re.compile(r"^neighbor_(\d+)\.(png|jpg|jpeg|webp)$")
# Distinct streams of the one seed: shard order, shuffle buffer, neighbor choice.
_SHARD_STREAM, _SHUFFLE_STREAM, _NEIGHBOR_STREAM = 0, 1, 2

Tokenize = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass
class InputPosition:
  """Where one host's stream stands; saved in checkpoints, restored on resume."""
  epoch: int = 0
  consumed: int = 0  # raw samples drawn from this epoch's (shuffled) stream, skipped ones included

  def to_array(self) -> np.ndarray:
    return np.array([self.epoch, self.consumed], dtype=np.int64)

  @classmethod
  def from_array(cls, a: Any) -> "InputPosition":
    a = np.asarray(a)
    if a.shape != (2,):
      raise ValueError(f"an input position is an array of 2 ints (epoch, consumed), got shape {a.shape}")
    epoch, consumed = int(a[0]), int(a[1])
    if epoch < 0 or consumed < 0:
      raise ValueError(f"an input position cannot be negative, got epoch={epoch} consumed={consumed}")
    return cls(epoch=epoch, consumed=consumed)


# ----------------------------------------------------------------------------------------------
# Shard lists.

def _is_remote(spec: str) -> bool:
  return "://" in spec or spec.startswith("pipe:")


def _split_top_level_commas(spec: str) -> list[str]:
  """'a,b-{1,2}.tar' -> ['a', 'b-{1,2}.tar']: commas inside braces belong to a brace pattern."""
  parts, depth, current = [], 0, []
  for ch in spec:
    depth += (ch == "{") - (ch == "}")
    if ch == "," and depth == 0:
      parts.append("".join(current))
      current = []
    else:
      current.append(ch)
  parts.append("".join(current))
  return [p.strip() for p in parts if p.strip()]


def _local_shards(spec: str) -> list[str]:
  if "{" in spec:
    found = []
    for path in braceexpand.braceexpand(spec):
      if any(c in path for c in "*?["):
        found += _local_shards(path)
      elif os.path.isfile(path) and path.endswith(TAR_SUFFIXES):
        found.append(path)
    return found
  try:
    return [p for p in list_shards(spec) if p.endswith(TAR_SUFFIXES)]
  except ValueError:
    return []


def resolve_shards(spec: str | Sequence[str]) -> list[str]:
  """Tar shards for a local path / glob / folder / brace pattern, a comma list, or a sequence of them; remote
  URLs (gs://..., pipe:...) are brace-expanded and passed through unchecked. Sorted, without duplicates."""
  parts = _split_top_level_commas(spec) if isinstance(spec, str) else [str(s).strip() for s in spec]
  found: set[str] = set()
  for part in parts:
    if _is_remote(part):
      found.update(braceexpand.braceexpand(part))
    else:
      found.update(_local_shards(part))
  if not found:
    shown = spec if isinstance(spec, str) else ",".join(str(s) for s in spec)
    raise ValueError(f"data.shards {shown!r} matches no shards")
  return sorted(found)


# ----------------------------------------------------------------------------------------------
# Raw samples: the project's tar reader over local files or webdataset streams, every error counted, never raised.

def _shard_samples(url: str, counters: collections.Counter) -> Iterator[dict[str, Any]]:
  """The raw samples of one shard (dicts of field -> bytes, plus __key__), read by the project's one tar reader
  (suti.core.tar_io) from a local file or, for a remote URL (gs://, pipe:), webdataset's gopen stream: every
  damage is counted there."""
  try:
    if _is_remote(url):
      # lazy: importing webdataset imports torch (~1.3 s of every trainer start), and only remote URLs need it
      from webdataset.gopen import gopen
      stream = gopen(url)
    else:
      stream = open(url, "rb")
  except Exception:  # noqa: BLE001 -- a missing file or a failing pipe: count it, go on
    counters["unreadable_shard"] += 1
    return
  with contextlib.closing(stream):
    for key, fields in iter_tar_samples(stream, counters):
      yield {"__key__": key, **fields}


def _shuffled(items: Iterable[Any], buffer_size: int, rng: np.random.Generator) -> Iterator[Any]:
  """A shuffle buffer: each arriving item replaces a random one of the buffer, which comes out."""
  if buffer_size <= 1:
    yield from items
    return
  buffer: list[Any] = []
  for item in items:
    if len(buffer) < buffer_size:
      buffer.append(item)
      continue
    j = int(rng.integers(buffer_size))
    buffer[j], item = item, buffer[j]
    yield item
  for j in rng.permutation(len(buffer)):
    yield buffer[int(j)]


# ----------------------------------------------------------------------------------------------
# Decoding one raw sample.

class _Skip(Exception):
  """A sample that cannot be used; `reason` is its counter key."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def _text(raw: dict, field: str) -> str | None:
  data = raw.get(field)
  if data is None:
    return None
  try:
    text = data.decode("utf-8").strip()
  except UnicodeDecodeError:
    raise _Skip("non_utf8_text") from None
  return text or None


def _pair_caption(raw: dict) -> str:
  caption = _text(raw, "txt")
  if caption is None and "json" in raw:
    try:
      caption = json.loads(raw["json"]).get("caption")
    except (ValueError, AttributeError):
      raise _Skip("bad_json") from None
    caption = caption.strip() if isinstance(caption, str) else None
  if not caption:
    raise _Skip("missing_caption")
  return caption


def _image(data: bytes, size: int) -> np.ndarray:
  try:
    return to_model_range(resize_and_crop(decode_image(data), size))
  except ImageRejected as e:
    raise _Skip(e.reason) from None


@dataclasses.dataclass
class _Example:
  key: str
  image: np.ndarray  # float32 [H, W, 3] in [-1, 1]
  text: str
  neighbor_images: list[np.ndarray] = dataclasses.field(default_factory=list)
  neighbor_texts: list[str] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# The stream.

class TrainInput:
  """Host-local training batches, forever; see the module docstring for the rules of the stream.

  Batches (numpy): images float32 [B,H,W,3] in [-1,1]; ids int32 [B,L]; text_mask [B,L]; keys str [B]; texts str [B]
  (the captions, for previews); for
  kind="icl" also neighbor_images [B,K,H,W,3], neighbor_ids int32 [B,K,L], neighbor_text_mask [B,K,L],
  neighbor_mask bool [B,K]. Padding neighbors have zero images, neighbor_mask False, and the tokens of the
  empty caption (a valid null text, so a text encoder never sees a fully masked row).
  """

  def __init__(self, shards: str | Sequence[str], *, kind: str, image_size: int, batch_size: int,
               tokenize: Tokenize, num_neighbors: int = 0, seed: int = 0, process_index: int = 0,
               process_count: int = 1, shuffle_buffer: int = 1000, prefetch: int = 2,
               position: InputPosition | None = None):
    if kind not in KINDS:
      raise ValueError(f"input kind must be one of {KINDS}, got {kind!r}")
    if kind == "icl" and num_neighbors < 1:
      raise ValueError(f"icl input needs num_neighbors >= 1, got {num_neighbors}")
    if image_size < 1 or batch_size < 1:
      raise ValueError(f"image_size and batch_size must be >= 1, got {image_size} and {batch_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    if prefetch < 0 or shuffle_buffer < 0:
      raise ValueError(f"prefetch and shuffle_buffer must be >= 0, got {prefetch} and {shuffle_buffer}")
    self.shards = resolve_shards(shards)
    if len(self.shards) < process_count:
      raise ValueError(f"data.shards has {len(self.shards)} shards, fewer than the {process_count} processes "
                       "that must each read their own")
    self.kind = kind
    self.image_size = image_size
    self.batch_size = batch_size
    self.tokenize = tokenize
    self.num_neighbors = num_neighbors if kind == "icl" else 0
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.shuffle_buffer = shuffle_buffer
    self.prefetch = prefetch
    self.counters: collections.Counter = collections.Counter()  # up to the last batch handed out
    self._new_counts: collections.Counter = collections.Counter()  # the generator's, since its last batch
    self._position = dataclasses.replace(position) if position is not None else InputPosition()
    self._batches: Iterator[tuple[dict[str, np.ndarray], InputPosition, collections.Counter]] | None = None
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()
    self._error: BaseException | None = None
    self._closed = False

  # -- the deterministic stream ----------------------------------------------------------------

  def host_shards(self, epoch: int) -> list[str]:
    """The shards this host reads in `epoch`, in reading order."""
    perm = np.random.default_rng([self.seed, epoch, _SHARD_STREAM]).permutation(len(self.shards))
    return [self.shards[int(i)] for i in perm[self.process_index::self.process_count]]

  def _raw_epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
    raw = (s for url in self.host_shards(epoch) for s in _shard_samples(url, self._new_counts))
    rng = np.random.default_rng([self.seed, epoch, self.process_index, _SHUFFLE_STREAM])
    return _shuffled(raw, self.shuffle_buffer, rng)

  def _decode(self, raw: dict[str, Any], epoch: int, index: int) -> _Example:
    key = raw["__key__"]
    if self.kind == "pairs":
      text = _pair_caption(raw)
      data = next((raw[f] for f in IMAGE_FIELDS if f in raw), None)
      if data is None:
        raise _Skip("missing_image")
      return _Example(key, _image(data, self.image_size), text)
    target = next((raw[f"target.{f}"] for f in IMAGE_FIELDS if f"target.{f}" in raw), None)
    if target is None:
      raise _Skip("missing_image")
    text = _text(raw, "target.txt")
    if text is None:
      raise _Skip("missing_caption")
    image = _image(target, self.image_size)
    return _Example(key, image, text, *self._neighbors(raw, epoch, index))

  def _neighbors(self, raw: dict[str, Any], epoch: int, index: int) -> tuple[list[np.ndarray], list[str]]:
    """Up to K decodable neighbors; with more than K, K of them picked by an rng of the sample's position
    (so a resumed stream picks the same), kept in their stored order."""
    found = sorted((int(m.group(1)), field) for field in raw if (m := _NEIGHBOR_IMAGE.match(field)))
    if not found:
      raise _Skip("no_neighbors")
    rng = np.random.default_rng([self.seed, epoch, self.process_index, index, _NEIGHBOR_STREAM])
    chosen: list[tuple[int, np.ndarray]] = []
    for j in rng.permutation(len(found)) if len(found) > self.num_neighbors else range(len(found)):
      n, field = found[int(j)]
      try:
        chosen.append((n, _image(raw[field], self.image_size)))
      except _Skip as e:
        self._new_counts[f"neighbor_{e.reason}"] += 1  # the sample stays; this neighbor is dropped
      if len(chosen) == self.num_neighbors:
        break
    if not chosen:
      raise _Skip("no_usable_neighbors")
    chosen.sort(key=lambda c: c[0])
    texts = []
    for n, _ in chosen:
      try:
        texts.append(_text(raw, f"neighbor_{n}.txt") or "")
      except _Skip:
        texts.append("")
    return [image for _, image in chosen], texts

  def _tokens(self, texts: list[str], rows: int) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = self.tokenize(texts)
    ids, mask = np.asarray(ids), np.asarray(mask)
    if ids.ndim != 2 or ids.shape[0] != rows or mask.shape != ids.shape:
      raise ValueError(f"tokenize must return ids and mask of shape [{rows}, L], got {ids.shape} and {mask.shape}")
    return ids.astype(np.int32), mask

  def _collate(self, examples: list[_Example]) -> dict[str, np.ndarray]:
    b = len(examples)
    ids, mask = self._tokens([e.text for e in examples], b)
    batch = {"images": np.stack([e.image for e in examples]), "ids": ids, "text_mask": mask,
             "keys": np.array([e.key for e in examples], dtype=str),
             "texts": np.array([e.text for e in examples], dtype=str)}
    if self.kind == "icl":
      n = pad_neighbors([e.neighbor_images for e in examples], [e.neighbor_texts for e in examples],
                        num_neighbors=self.num_neighbors, image_size=self.image_size, tokenize=self.tokenize)
      batch.update(neighbor_images=n["images"], neighbor_ids=n["ids"], neighbor_text_mask=n["text_mask"],
                   neighbor_mask=n["neighbor_mask"])
    return batch

  def _generate(self) -> Iterator[tuple[dict[str, np.ndarray], InputPosition, collections.Counter]]:
    """(batch, position just after it, skips counted since the previous batch), forever, from the position
    given at construction. Counts travel with their batch, so `counters` never runs ahead of `position`."""
    epoch, skip = self._position.epoch, self._position.consumed
    pending: list[_Example] = []
    while True:
      consumed = usable = 0
      epoch_counts: collections.Counter = collections.Counter()
      for raw in self._raw_epoch(epoch):
        consumed += 1
        if consumed <= skip:
          continue  # drawn before the resume point: not decoded
        try:
          pending.append(self._decode(raw, epoch, consumed - 1))
        except _Skip as e:
          self._new_counts[e.reason] += 1
          continue
        usable += 1
        if len(pending) == self.batch_size:
          counts = collections.Counter(self._new_counts)  # a copy: open shard readers hold the original
          self._new_counts.clear()
          epoch_counts.update(counts)
          yield self._collate(pending), InputPosition(epoch, consumed), counts
          pending = []
      if consumed < skip:
        raise ValueError(f"input position (epoch {epoch}, consumed {skip}) lies past the end of that epoch "
                         f"({consumed} samples): data.shards changed since the checkpoint?")
      if usable == 0 and skip == 0:
        epoch_counts.update(self._new_counts)
        raise ValueError(f"no usable samples in data.shards ({len(self.host_shards(epoch))} shards of "
                         f"process {self.process_index}, epoch {epoch}): {dict(sorted(epoch_counts.items()))}")
      epoch, skip = epoch + 1, 0

  # -- prefetching and the iterator protocol ------------------------------------------------------

  def _fill_queue(self) -> None:
    try:
      for item in self._generate():
        if not self._put_until_stopped(item):
          return
    except BaseException as e:  # noqa: BLE001 -- handed to the caller, raised there
      self._put_until_stopped(e)

  def _put_until_stopped(self, item) -> bool:
    """Puts `item` on the queue, waiting for room; False if close() was called meanwhile."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _start(self) -> None:
    if self.prefetch == 0:
      self._batches = self._generate()
      return
    self._queue = queue.Queue(maxsize=self.prefetch)
    self._thread = threading.Thread(target=self._fill_queue, name="TrainInput-prefetch", daemon=True)
    self._thread.start()

  def __iter__(self) -> "TrainInput":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._error is not None:
      raise self._error  # the stream stopped on this error; it stays stopped
    if self._closed:
      raise ValueError("TrainInput is closed")
    if self._batches is None and self._thread is None:
      self._start()
    if self._batches is not None:
      try:
        batch, position, counts = next(self._batches)
      except Exception as e:
        self._error = e
        raise
    else:
      item = self._queue.get()
      if isinstance(item, BaseException):
        self._error = item
        self.close()
        raise item
      batch, position, counts = item
    self._position = position
    self.counters.update(counts)
    return batch

  @property
  def position(self) -> InputPosition:
    """The position just after the last batch handed out (what a checkpoint stores)."""
    return dataclasses.replace(self._position)

  def close(self) -> None:
    """Stops the prefetch thread (waits for it); the stream cannot be read after this."""
    self._closed = True
    self._stop.set()
    if self._thread is not None:
      while self._thread.is_alive():
        with contextlib.suppress(queue.Empty):
          self._queue.get_nowait()  # unblocks a put in progress
        self._thread.join(timeout=0.1)
      self._thread = None
    if self._batches is not None:
      self._batches.close()
      self._batches = None

  def __enter__(self) -> "TrainInput":
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  def __del__(self) -> None:
    with contextlib.suppress(Exception):
      self.close()
