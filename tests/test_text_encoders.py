"""Text encoders: byte tokenizer, embedded encoder, T5 / CLIP parity with Hugging Face PyTorch, errors."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from flax import nnx

import suti  # noqa: F401  (installs the torchvision shim before transformers is imported)
from suti.models import convert_hf_text
from suti.models.t5 import relative_position_buckets
from suti.models.text_encoder import PretrainedTextEncoder, TextEncoder, build_text_encoder
from suti.models.tokenizer import ByteTokenizer
from shared_fixtures import LazyImport

torch = LazyImport("torch")
transformers = LazyImport("transformers")


def _text_cfg(**overrides) -> mlc.ConfigDict:
  cfg = mlc.ConfigDict(dict(kind="embedded", checkpoint="", max_length=16, width=32, layers=2, heads=4, trainable=True))
  cfg.update(overrides)
  return cfg


# ---------------------------------------------------------------- byte tokenizer

def test_byte_tokenizer_round_trip_and_layout():
  tokenizer = ByteTokenizer()
  texts = ["a red teapot", "", "café ☕ on snow"]
  ids, mask = tokenizer.encode(texts, 32)
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape == (3, 32)
  assert tokenizer.decode(ids) == texts
  np.testing.assert_array_equal(mask.sum(1), [len(t.encode()) + 2 for t in texts])
  np.testing.assert_array_equal(ids[1, :3], [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id])
  assert ids[0, 1] == ord("a") + tokenizer.byte_offset
  again, _ = tokenizer.encode(texts, 32)
  np.testing.assert_array_equal(ids, again)


def test_byte_tokenizer_truncates_at_whole_characters():
  tokenizer = ByteTokenizer()
  ids, mask = tokenizer.encode(["abcdefghij", "ééééé"], 7)  # room for 5 bytes
  assert tokenizer.decode(ids) == ["abcde", "éé"]  # "é" is 2 bytes: the half third one is dropped
  np.testing.assert_array_equal(mask.sum(1), [7, 6])
  assert (ids[:, 0] == tokenizer.bos_id).all() and ids[0, 6] == tokenizer.eos_id and ids[1, 5] == tokenizer.eos_id


@pytest.mark.parametrize("texts, max_length, message", [
    (["x"], 1, "at least 2"), ("a prompt", 8, "list of strings"), ([3], 8, "expects strings")])
def test_byte_tokenizer_errors(texts, max_length, message):
  with pytest.raises(ValueError, match=message):
    ByteTokenizer().encode(texts, max_length)


# ---------------------------------------------------------------- embedded encoder

@pytest.fixture(scope="module")
def embedded():
  return build_text_encoder(_text_cfg(), rngs=nnx.Rngs(0))


def test_embedded_shapes_and_null_prompt(embedded):
  assert isinstance(embedded, TextEncoder) and embedded.width == 32
  ids, mask = embedded.tokenize(["a blue cube on the beach", ""])
  emb, pooled = embedded(jnp.asarray(ids), jnp.asarray(mask))
  assert emb.shape == (2, 16, 32) and pooled.shape == (2, 32)
  assert np.isfinite(np.asarray(emb)).all()
  assert not np.allclose(pooled[0], pooled[1])  # the null prompt differs from a real one


def test_embedded_padding_invariance(embedded):
  ids, mask = embedded.tokenize(["a hat", "a striped dog in snow"])
  emb, pooled = embedded(jnp.asarray(ids), jnp.asarray(mask))
  garbage = np.where(mask, ids, np.random.default_rng(0).integers(3, 259, ids.shape)).astype(np.int32)
  emb_g, pooled_g = embedded(jnp.asarray(garbage), jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(pooled), np.asarray(pooled_g))
  np.testing.assert_array_equal(np.asarray(emb)[mask], np.asarray(emb_g)[mask])
  # Fewer pad positions (a shorter padded length) leave valid positions and pooled unchanged too.
  short = int(mask.sum(1).max())
  emb_s, pooled_s = embedded(jnp.asarray(ids[:, :short]), jnp.asarray(mask[:, :short]))
  np.testing.assert_allclose(np.asarray(pooled_s), np.asarray(pooled), atol=1e-6)
  np.testing.assert_allclose(np.asarray(emb_s)[mask[:, :short]], np.asarray(emb)[mask], atol=1e-6)


def test_embedded_under_jit_with_split_state(embedded):
  graphdef, state = nnx.split(embedded)
  ids, mask = embedded.tokenize(["a cone"])

  @jax.jit
  def encode(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)

  emb, pooled = encode(state, ids, mask)
  emb_eager, pooled_eager = embedded(jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(pooled), np.asarray(pooled_eager), atol=1e-6)


@pytest.mark.parametrize("overrides, kwargs, message", [
    (dict(kind="bert"), {}, "unknown text.kind 'bert'"),
    (dict(kind="t5"), {}, "needs text.checkpoint"),
    (dict(kind="clip", checkpoint="/nonexistent/clip"), {}, "is not a folder"),
    (dict(heads=5), {}, "not divisible"),
    (dict(), dict(cross_attention_dim=64), "cross_attention_dim 64"),
])
def test_build_errors(overrides, kwargs, message):
  with pytest.raises(ValueError, match=message):
    build_text_encoder(_text_cfg(**overrides), rngs=nnx.Rngs(0), **kwargs)


# ---------------------------------------------------------------- T5

def _tiny_t5(folder, feed_forward_proj="gated-gelu"):
  config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                 feed_forward_proj=feed_forward_proj)
  torch.manual_seed(0)
  model = transformers.T5EncoderModel(config).eval()
  model.save_pretrained(folder)
  return model


def _ids_and_mask(vocab, lengths, total, eos):
  rng = np.random.default_rng(1)
  ids = np.zeros((len(lengths), total), np.int64)
  for row, n in enumerate(lengths):
    ids[row, : n - 1] = rng.integers(3, vocab - 1, n - 1)
    ids[row, n - 1] = eos
  return ids, np.arange(total)[None, :] < np.asarray(lengths)[:, None]


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_t5_matches_hugging_face(tmp_path, feed_forward_proj):
  reference = _tiny_t5(tmp_path, feed_forward_proj)
  ours = convert_hf_text.load_t5_encoder(str(tmp_path))
  ids, mask = _ids_and_mask(64, [5, 20, 12], 20, eos=1)  # 20 tokens reach the log-spaced buckets
  with torch.no_grad():
    expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).last_hidden_state
  hidden, pooled = ours(jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
  assert np.abs(np.asarray(hidden) - expected.numpy()).max() < 1e-4
  mean = (expected.numpy() * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  assert np.abs(np.asarray(pooled) - mean).max() < 1e-4


def test_t5_relative_buckets_match_hugging_face_exactly():
  from transformers.models.t5.modeling_t5 import T5Attention

  length = 700
  relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
  for num_buckets, max_distance in ((32, 128), (8, 16)):
    expected = T5Attention._relative_position_bucket(relative, True, num_buckets, max_distance).numpy()
    np.testing.assert_array_equal(relative_position_buckets(length, length, num_buckets, max_distance), expected)


def test_t5_from_pytorch_bin_and_weight_errors(tmp_path):
  reference = _tiny_t5(tmp_path / "bin")
  os.remove(tmp_path / "bin" / "model.safetensors")
  torch.save(reference.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
  ours = convert_hf_text.load_t5_encoder(str(tmp_path / "bin"))
  np.testing.assert_array_equal(np.asarray(ours.layers[1].wo.kernel[...]),
                                reference.encoder.block[1].layer[1].DenseReluDense.wo.weight.detach().numpy().T)

  from safetensors.numpy import load_file, save_file
  _tiny_t5(tmp_path / "st")
  weights = load_file(tmp_path / "st" / "model.safetensors")
  del weights["encoder.block.1.layer.0.SelfAttention.k.weight"]
  save_file(weights, tmp_path / "st" / "model.safetensors")
  with pytest.raises(ValueError, match="missing the weight 'encoder.block.1.layer.0.SelfAttention.k.weight'"):
    convert_hf_text.load_t5_encoder(str(tmp_path / "st"))

  _tiny_t5(tmp_path / "shape")
  config = json.loads((tmp_path / "shape" / "config.json").read_text())
  config["d_ff"] = 40
  (tmp_path / "shape" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"shape mismatch for layers\.0\.wi_0\.kernel"):
    convert_hf_text.load_t5_encoder(str(tmp_path / "shape"))

  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="no model.safetensors or pytorch_model.bin"):
    convert_hf_text.load_t5_encoder(str(tmp_path / "empty"))


def _save_word_tokenizer(folder, words, **special):
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {word: i for i, word in enumerate(words)}
  backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **special).save_pretrained(folder)


def test_build_t5_from_local_folder(tmp_path):
  _tiny_t5(tmp_path)
  _save_word_tokenizer(tmp_path, ["<pad>", "</s>", "<unk>", "a", "teapot", "on", "the", "beach"],
                       pad_token="<pad>", eos_token="</s>")
  encoder = build_text_encoder(_text_cfg(kind="t5", checkpoint=str(tmp_path), max_length=8), rngs=nnx.Rngs(0))
  assert isinstance(encoder, PretrainedTextEncoder) and encoder.width == 32
  ids, mask = encoder.tokenize(["a teapot on the beach", ""])
  np.testing.assert_array_equal(ids[0, :5], [3, 4, 5, 6, 7])
  assert ids.shape == (2, 8) and mask[0].sum() == 5 and ids.dtype == np.int32
  emb, pooled = encoder(jnp.asarray(ids), jnp.asarray(mask))
  assert emb.shape == (2, 8, 32) and pooled.shape == (2, 32)
  with pytest.raises(ValueError, match="text.width is 64 but the t5 encoder is 32 wide"):
    build_text_encoder(_text_cfg(kind="t5", checkpoint=str(tmp_path), width=64), rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- CLIP

def _tiny_clip(folder, hidden_act="quick_gelu", eos_token_id=63):
  config = transformers.CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=16, hidden_act=hidden_act,
                                       bos_token_id=62, eos_token_id=eos_token_id, pad_token_id=0)
  torch.manual_seed(0)
  model = transformers.CLIPTextModel(config).eval()
  model.save_pretrained(folder)
  return model


@pytest.mark.parametrize("hidden_act, eos_token_id", [("quick_gelu", 63), ("gelu", 2)])
def test_clip_matches_hugging_face(tmp_path, hidden_act, eos_token_id):
  reference = _tiny_clip(tmp_path, hidden_act, eos_token_id)
  ours = convert_hf_text.load_clip_text(str(tmp_path))
  ids, mask = _ids_and_mask(62, [4, 16, 9], 16, eos=63)  # 63 is both the eos id and the largest id
  with torch.no_grad():
    unmasked = reference(input_ids=torch.tensor(ids))
    masked = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)))
  hidden, pooled = ours(jnp.asarray(ids, jnp.int32))
  assert np.abs(np.asarray(hidden) - unmasked.last_hidden_state.numpy()).max() < 1e-4
  assert np.abs(np.asarray(pooled) - unmasked.pooler_output.numpy()).max() < 1e-4
  hidden_m, pooled_m = ours(jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
  assert np.abs(np.asarray(hidden_m) - masked.last_hidden_state.numpy()).max() < 1e-4
  assert np.abs(np.asarray(pooled_m) - masked.pooler_output.numpy()).max() < 1e-4


def test_build_clip_stable_diffusion_layout(tmp_path):
  # Stable Diffusion keeps the tokenizer beside the text encoder, under text_encoder/ and tokenizer/.
  reference = _tiny_clip(tmp_path / "text_encoder")
  _save_word_tokenizer(tmp_path / "tokenizer", ["<pad>", "<unk>", "a", "dog"] + [f"w{i}" for i in range(58)]
                       + ["<bos>", "<eos>"], pad_token="<pad>", eos_token="<eos>")
  cfg = _text_cfg(kind="clip", checkpoint=str(tmp_path / "text_encoder"), max_length=6)
  encoder = build_text_encoder(cfg, rngs=nnx.Rngs(0), cross_attention_dim=32)
  ids = np.array([[2, 3, 63, 0, 0, 0]], np.int32)
  emb, pooled = encoder(jnp.asarray(ids), jnp.asarray(ids != 0))
  with torch.no_grad():
    expected = reference(input_ids=torch.tensor(ids, dtype=torch.long)).pooler_output.numpy()
  assert np.abs(np.asarray(pooled) - expected).max() < 1e-4
  with pytest.raises(ValueError, match="exceeds CLIP's 16 positions"):
    build_text_encoder(_text_cfg(kind="clip", checkpoint=str(tmp_path / "text_encoder"), max_length=77),
                       rngs=nnx.Rngs(0))
