"""Tokenizers for the text encoders: a byte-level one that needs no vocabulary file (the embedded default)
and a thin wrapper around a Hugging Face tokenizer loaded from a local folder (T5, CLIP).

Both return host-side numpy arrays `(ids int32 [B, L], mask bool [B, L])` with L = max_length exactly,
so shapes are static under jit.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

# Files that make a folder a Hugging Face tokenizer folder.
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json")


def _check_texts(texts: Sequence[str]) -> None:
  if isinstance(texts, str):
    raise ValueError("tokenize expects a list of strings, got a single string")
  for text in texts:
    if not isinstance(text, str):
      raise ValueError(f"tokenize expects strings, got {type(text).__name__}")


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes shifted past three special ids: `[bos, b_0 + 3, ..., b_n + 3, eos, pad, ...]`.

  Truncation: texts longer than `max_length - 2` bytes keep their longest prefix of whole UTF-8
  characters that fits, so bos and eos are always present and decoding never sees half a character.
  The empty string encodes to `[bos, eos]`, the "null" prompt of classifier-free guidance.
  """

  pad_id: int = 0
  bos_id: int = 1
  eos_id: int = 2
  byte_offset: int = 3

  @property
  def vocab_size(self) -> int:
    return self.byte_offset + 256

  def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids int32 [B, max_length], mask bool [B, max_length]); mask is True on bos, bytes and eos."""
    _check_texts(texts)
    if max_length < 2:
      raise ValueError(f"max_length must be at least 2 (bos + eos), got {max_length}")
    ids = np.full((len(texts), max_length), self.pad_id, dtype=np.int32)
    for row, text in enumerate(texts):
      data = text.encode("utf-8")
      if len(data) > max_length - 2:
        # Drop a trailing partial character left by the cut.
        data = data[: max_length - 2].decode("utf-8", errors="ignore").encode("utf-8")
      ids[row, 0] = self.bos_id
      ids[row, 1 : 1 + len(data)] = np.frombuffer(data, dtype=np.uint8).astype(np.int32) + self.byte_offset
      ids[row, 1 + len(data)] = self.eos_id
    return ids, ids != self.pad_id

  def decode(self, ids: np.ndarray) -> list[str]:
    """Inverse of `encode` (up to truncation): ids [B, L] -> texts; stops at the first eos."""
    texts = []
    for row in np.asarray(ids):
      data = bytearray()
      for token in row.tolist():
        if token == self.eos_id:
          break
        if token >= self.byte_offset:
          data.append(token - self.byte_offset)
      texts.append(data.decode("utf-8", errors="replace"))
    return texts


def find_hf_tokenizer_folder(model_folder: str, override: str = "") -> str:
  """The tokenizer folder for a local Hugging Face model folder: `override` if given, else the model
  folder itself, else its sibling `tokenizer/` (the Stable Diffusion layout: text_encoder/ + tokenizer/)."""
  candidates = [override] if override else [model_folder, os.path.join(os.path.dirname(os.path.abspath(model_folder)), "tokenizer")]
  for folder in candidates:
    if any(os.path.isfile(os.path.join(folder, name)) for name in _HF_TOKENIZER_FILES):
      return folder
  raise ValueError(f"no tokenizer files ({', '.join(_HF_TOKENIZER_FILES)}) in {' or '.join(candidates)}")


class HFTokenizer:
  """A Hugging Face tokenizer from a local folder (never downloads), padded to max_length and truncated."""

  def __init__(self, folder: str):
    from transformers import AutoTokenizer  # lazy: transformers only for a Hugging Face tokenizer

    self.folder = folder
    try:
      self._tokenizer: Any = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
      raise ValueError(f"cannot load a tokenizer from {folder}: {str(error).splitlines()[0]}") from error

  @property
  def vocab_size(self) -> int:
    return len(self._tokenizer)

  def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids int32 [B, max_length], mask bool [B, max_length]); longer texts are cut at max_length
    tokens (the tokenizer keeps its end-of-sequence token)."""
    _check_texts(texts)
    if self._tokenizer.pad_token is None:
      raise ValueError(f"the tokenizer in {self.folder} has no pad token")
    batch = self._tokenizer(
        list(texts), max_length=max_length, padding="max_length", truncation=True, return_tensors="np")
    return batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(bool)

  def __repr__(self) -> str:
    return f"HFTokenizer({self.folder!r})"
