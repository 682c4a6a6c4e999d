"""Shard readers and safe decoding: hostile inputs are counted by reason, never fatal, never extracted."""
import collections
import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from data_pipeline import sources
from suti.core.safe_image import ImageRejected, decode_image
from data_pipeline.sources import iter_shard, read_shard
from suti.core.shards import list_shards
from suti.core.tar_io import safe_member_name, write_tar


def _png(arr, mode=None):
  buf = io.BytesIO()
  (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, format="PNG")
  return buf.getvalue()


def _jpeg(arr):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


RED = np.full((8, 8, 3), (200, 30, 40), np.uint8)


def _sample(key, image=None, caption=b"a red ball", meta=None, ext="png"):
  meta = {"url": f"http://img.example/{key}.png", "key": key} if meta is None else meta
  members = []
  if image is not False:
    members.append((f"{key}.{ext}", _png(RED) if image is None else image))
  if caption is not None:
    members.append((f"{key}.txt", caption))
  if meta is not False:
    members.append((f"{key}.json", meta if isinstance(meta, bytes) else json.dumps(meta).encode()))
  return members


# ----------------------------------------------------------------------------------------------
# Member names and the atomic tar writer.

@pytest.mark.parametrize("name,ok", [
    ("00001.jpg", True), ("part/00001.jpg", True), ("a.b.c", True),
    ("", False), ("/etc/passwd", False), ("../x.jpg", False), ("a/../../x.jpg", False),
    ("a/./b.jpg", False), ("a//b.jpg", False), ("C:evil.jpg", False), ("a\\..\\b", False),
    ("bad\nname", False), ("dir/", False),
])
def test_safe_member_name(name, ok):
  assert safe_member_name(name) is ok


def test_write_tar_is_deterministic_and_refuses_unsafe_names(tmp_path):
  members = _sample("00000") + _sample("00001")
  a, b = str(tmp_path / "a.tar"), str(tmp_path / "b.tar")
  write_tar(a, members)
  write_tar(b, members)
  assert open(a, "rb").read() == open(b, "rb").read()
  assert sorted(os.listdir(tmp_path)) == ["a.tar", "b.tar"]  # no temporary left behind
  with tarfile.open(a) as tar:
    assert [m.name for m in tar.getmembers()] == [n for n, _ in members]
  with pytest.raises(ValueError, match="unsafe"):
    write_tar(str(tmp_path / "c.tar"), [("../escape.png", b"x")])
  assert not os.path.exists(tmp_path / "c.tar")
  assert sorted(os.listdir(tmp_path)) == ["a.tar", "b.tar"]


# ----------------------------------------------------------------------------------------------
# Tar reading.

def test_reads_good_samples(tmp_path):
  path = str(tmp_path / "00000.tar")
  write_tar(path, _sample("00000") + _sample("00001", meta={
      "url": "http://img.example/1.png", "page_url": "https://shop.example/p"}))
  samples, counts = read_shard(path)
  assert counts.yielded == 2 and counts.total_in == 2 and not counts.dropped
  s0, s1 = samples
  assert s0.key == "00000" and s0.caption == "a red ball" and s0.page_url is None
  assert s1.page_url == "https://shop.example/p" and s1.url == "http://img.example/1.png"
  assert np.array_equal(s0.image, RED) and s0.source == path


def _raw_tar(path, entries):
  """A tar with hand-made members (kinds tarfile can write but write_tar refuses)."""
  with tarfile.open(path, "w") as tar:
    for info, data in entries:
      tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _info(name, data=b"", kind=tarfile.REGTYPE, linkname=""):
  info = tarfile.TarInfo(name)
  info.type = kind
  info.size = len(data) if kind == tarfile.REGTYPE else 0
  info.linkname = linkname
  return info


def test_unsafe_members_are_counted_and_never_extracted(tmp_path):
  work = tmp_path / "work"
  work.mkdir()
  path = str(work / "evil.tar")
  png = _png(RED)
  meta = json.dumps({"url": "http://x/1.png"}).encode()
  entries = [
      (_info("/tmp/abs_escape.png", png), png),
      (_info("../up_escape.png", png), png),
      (_info("a/../../deep_escape.png", png), png),
      (_info("link.png", kind=tarfile.SYMTYPE, linkname="/etc/passwd"), None),
      (_info("hard.png", kind=tarfile.LNKTYPE, linkname="good.png"), None),
      (_info("dev.png", kind=tarfile.CHRTYPE), None),
      (_info("fifo.png", kind=tarfile.FIFOTYPE), None),
      (_info("folder", kind=tarfile.DIRTYPE), None),
      (_info("good.png", png), png),
      (_info("good.json", meta), meta),
  ]
  _raw_tar(path, entries)
  before = set(os.listdir(tmp_path)) | set(os.listdir(work))
  drops = collections.Counter()
  samples = list(iter_shard(path, drops))
  assert [s.key for s in samples] == ["good"]
  assert drops == {"unsafe_member": 7}
  assert set(os.listdir(tmp_path)) | set(os.listdir(work)) == before
  assert not os.path.exists("/tmp/abs_escape.png")


def test_truncated_tar_keeps_what_was_read(tmp_path):
  full = str(tmp_path / "full.tar")
  members = []
  for i in range(6):
    members += _sample(f"{i:05d}")
  write_tar(full, members)
  data = open(full, "rb").read()
  complete, _ = read_shard(full)
  assert len(complete) == 6
  cut_path = str(tmp_path / "cut.tar")
  seen_partial = False
  for cut in range(0, len(data), 256):
    with open(cut_path, "wb") as f:
      f.write(data[:cut])
    samples, counts = read_shard(cut_path)  # never raises
    assert [s.key for s in samples] == [s.key for s in complete[:len(samples)]]
    if cut < 512:
      assert counts.dropped == {"unreadable_shard": 1}
    elif 0 < len(samples) < 6:
      seen_partial = True
      assert counts.dropped["truncated_tar"] == 1
    if len(samples) < 6 and cut >= 512:
      assert counts.dropped["truncated_tar"] == 1
  assert seen_partial


def test_garbage_and_empty_tars(tmp_path):
  # No tar header can be read from an empty file or from random bytes (the header checksum fails): the shard
  # is one unreadable_shard. Zero blocks are a valid empty archive (the end marker): nothing in, nothing dropped.
  for name, data, dropped in (("empty.tar", b"", {"unreadable_shard": 1}),
                              ("garbage.tar", np.random.default_rng(0).bytes(4096), {"unreadable_shard": 1}),
                              ("zeros.tar", bytes(10240), {})):
    path = str(tmp_path / name)
    open(path, "wb").write(data)
    samples, counts = read_shard(path)
    assert samples == []
    assert counts.dropped == dropped, name
    assert counts.total_in == len(dropped), name


def test_truncated_gzip_tar(tmp_path):
  path = str(tmp_path / "s.tar.gz")
  members = []
  for i in range(4):
    members += _sample(f"{i:05d}", image=_png(np.random.default_rng(i).integers(
        0, 255, (16, 16, 3), dtype=np.uint8)))
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    for n, d in members:
      info = tarfile.TarInfo(n)
      info.size = len(d)
      tar.addfile(info, io.BytesIO(d))
  data = buf.getvalue()
  open(path, "wb").write(data)
  assert read_shard(path)[1].yielded == 4
  cut = data[: len(data) * 2 // 3]
  open(path, "wb").write(cut)
  # What the cut keeps: the tar bytes its gzip prefix decompresses to. A sample survives when all 3 of its
  # members end inside them; the next sample has no member read in full, so nothing of it is judged and the
  # lost rest is the one truncated_tar.
  available = len(zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(cut))
  with tarfile.open(fileobj=io.BytesIO(zlib.decompress(data, 16 + zlib.MAX_WBITS))) as tar:
    ends = collections.defaultdict(list)
    for m in tar.getmembers():
      ends[m.name.split(".")[0]].append(m.offset_data + m.size)
  complete = [k for k, e in ends.items() if max(e) <= available]
  partial = [k for k, e in ends.items() if min(e) <= available < max(e)]
  assert complete == ["00000", "00001"] and partial == []
  samples, counts = read_shard(path)
  assert [s.key for s in samples] == complete
  assert counts.dropped == {"truncated_tar": 1}


def test_bad_fields_are_counted(tmp_path):
  path = str(tmp_path / "bad.tar")
  truncated_jpeg = _jpeg(np.zeros((16, 16, 3), np.uint8))
  members = (
      _sample("good")
      + _sample("badjson", meta=b"{not json")
      + _sample("listjson", meta=b"[1, 2]")
      + _sample("deepjson", meta=b"[" * 100000)
      + _sample("noutf8", caption=b"\xff\xfe caption")
      + _sample("nojson", meta=False)
      + _sample("noimage", image=False)
      + _sample("zero", image=b"")
      + _sample("garbage", image=os.urandom(300))
      + _sample("trunc", image=truncated_jpeg[: len(truncated_jpeg) // 2], ext="jpg")
      + _sample("nourl", meta={"caption": "x"})
      + _sample("nocaption", caption=None, meta={"url": "http://x/y.png", "caption": "from json"})
  )
  write_tar(path, members)
  samples, counts = read_shard(path)
  assert [s.key for s in samples] == ["good", "nocaption"]
  assert samples[1].caption == "from json"
  assert counts.dropped == {
      "bad_json": 3, "non_utf8_text": 1, "missing_field:url": 2, "missing_field:image": 1,
      "zero_byte": 1, "undecodable_image": 1, "truncated_image": 1}
  assert counts.total_in == 12


def test_random_corruption_never_raises(tmp_path):
  """60 randomly corrupted copies of a 4-sample shard: reading never raises, and the pipeline run over all of
  them balances every stage and reports exactly the reader's counts."""
  from data_pipeline import stages
  from data_pipeline.runner_local import run_local
  from suti.config import load_config
  members = []
  for i in range(4):
    members += _sample(f"{i:05d}", image=_jpeg(np.full((16, 16, 3), 40 * i, np.uint8)), ext="jpg")
  good = str(tmp_path / "good.tar")
  write_tar(good, members)
  data = bytearray(open(good, "rb").read())
  rng = np.random.default_rng(0)
  web = tmp_path / "web"
  web.mkdir()
  yielded, drops = 0, collections.Counter()
  for n in range(60):
    mutated = bytearray(data)
    for pos in rng.integers(0, 6000, size=int(rng.integers(1, 20))):
      mutated[int(pos)] = int(rng.integers(0, 256))
    bad = str(web / f"{n:05d}.tar")
    open(bad, "wb").write(bytes(mutated))
    samples, counts = read_shard(bad)  # never raises
    assert all(s.image.dtype == np.uint8 and s.image.ndim == 3 for s in samples)
    assert counts.total_in >= 1  # a corrupted shard is never silently empty
    yielded += len(samples)
    drops.update(counts.dropped)
  config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "pipeline", "toy.py"),
                       [("stages", "('cluster_map', 'cluster_reduce', 'captions')")])
  stats = run_local(config, stages.RunLayout(tuple(list_shards(str(web))), str(tmp_path / "out")), progress=False)
  s = stats["stages"]
  assert list(s) == ["read", "cluster", "captions"]
  for name, c in s.items():
    assert c["in"] == c["out"] + sum(c["dropped"].values()), name
  assert s["read"] == {"in": yielded + sum(drops.values()), "out": yielded, "dropped": dict(sorted(drops.items()))}
  assert s["cluster"]["in"] == s["read"]["out"] and s["captions"]["in"] == s["cluster"]["out"]


# ----------------------------------------------------------------------------------------------
# Safe decoding.

def test_decompression_bomb_is_rejected_before_decoding():
  # A PNG header claiming 100000 x 100000 pixels: rejected from the header alone.
  def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
  ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
  bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(
      b"IEND", b"")
  with pytest.raises(ImageRejected) as e:
    decode_image(bomb)
  assert e.value.reason == "decompression_bomb"
  with pytest.raises(ImageRejected) as e:
    decode_image(_png(RED), max_pixels=63)
  assert e.value.reason == "decompression_bomb"


def test_truncated_png_is_rejected():
  data = _png(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
  with pytest.raises(ImageRejected) as e:
    decode_image(data[: len(data) - 20])
  assert e.value.reason in ("truncated_image", "undecodable_image")


def test_alpha_is_composited_on_white():
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[..., :3] = (200, 0, 0)
  rgba[0, 0, 3], rgba[0, 1, 3], rgba[1, 0, 3], rgba[1, 1, 3] = 0, 255, 128, 255
  out = decode_image(_png(rgba, "RGBA"))
  assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
  assert tuple(out[0, 0]) == (255, 255, 255)
  assert tuple(out[0, 1]) == (200, 0, 0)
  half = 128 / 255
  assert tuple(out[1, 0]) == (round(200 * half + 255 * (1 - half)), round(255 * (1 - half)),
                              round(255 * (1 - half)))
  la = np.stack([np.full((2, 2), 10, np.uint8), np.zeros((2, 2), np.uint8)], -1)
  assert (decode_image(_png(la, "LA")) == 255).all()


def test_palette_with_transparency_and_grayscale():
  img = Image.new("P", (2, 1))
  img.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
  img.putpixel((0, 0), 0)
  img.putpixel((1, 0), 1)
  buf = io.BytesIO()
  img.save(buf, format="PNG", transparency=0)
  out = decode_image(buf.getvalue())
  assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (0, 255, 0)
  gray = decode_image(_png(np.full((3, 3), 77, np.uint8), "L"))
  assert gray.shape == (3, 3, 3) and (gray == 77).all()
  bw = Image.new("1", (2, 2), 1)
  buf = io.BytesIO()
  bw.save(buf, format="PNG")
  assert (decode_image(buf.getvalue()) == 255).all()


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
  arr = np.array([[0, 32896, 65535]], np.uint16)
  img = Image.fromarray(arr)  # mode I;16
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  out = decode_image(buf.getvalue())
  assert out.shape == (1, 3, 3)
  assert list(out[0, :, 0]) == [0, 128, 255]


def test_cmyk_jpeg_becomes_rgb():
  cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
  buf = io.BytesIO()
  cmyk.save(buf, format="JPEG", quality=95)
  out = decode_image(buf.getvalue())
  assert out.shape == (8, 8, 3)
  r, g, b = out.reshape(-1, 3).mean(0)
  assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied():
  arr = np.zeros((4, 8, 3), np.uint8)
  arr[:, :4] = (255, 0, 0)  # left half red, right half black
  img = Image.fromarray(arr)
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 CW to display"
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
  out = decode_image(buf.getvalue())
  assert out.shape == (8, 4, 3)
  assert out[:3, :, 0].mean() > 200 and out[5:, :, 0].mean() < 50  # red ends on top


# ----------------------------------------------------------------------------------------------
# Parquet and Hugging Face datasets, and shard listing.

def test_parquet_reader(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  table = pa.table({
      "key": ["a", "b", "c", "d"],
      "url": ["http://x/a.png", "http://x/b.png", None, "http://x/d.png"],
      "page_url": ["https://p.example/1", None, None, ""],
      "caption": ["one", "two", "three", "four"],
      "jpg": [_png(RED), None, _png(RED), b"garbage"],
  })
  path = str(tmp_path / "part.parquet")
  pq.write_table(table, path)
  samples, counts = read_shard(path)
  assert [s.key for s in samples] == ["a"]
  assert samples[0].page_url == "https://p.example/1" and samples[0].caption == "one"
  assert np.array_equal(samples[0].image, RED)
  assert counts.dropped == {"missing_field:image": 1, "missing_field:url": 1,
                            "undecodable_image": 1}
  assert counts.total_in == 4


def test_datasets_folder_reader(tmp_path):
  import datasets
  features = datasets.Features({"image": datasets.Image(), "url": datasets.Value("string"),
                                "text": datasets.Value("string"),
                                "page_url": datasets.Value("string")})
  ds = datasets.Dataset.from_dict({
      "image": [{"bytes": _png(RED), "path": None}, {"bytes": b"", "path": None}],
      "url": ["http://x/1.png", "http://x/2.png"],
      "text": ["a red square", "empty"],
      "page_url": ["https://p.example/a", None]}, features=features)
  folder = str(tmp_path / "hf")
  ds.save_to_disk(folder)
  shards = list_shards(folder)
  assert shards and all(s.endswith(".arrow") for s in shards)
  drops = collections.Counter()
  samples = [s for p in shards for s in iter_shard(p, drops)]
  assert len(samples) == 1 and samples[0].caption == "a red square"
  assert samples[0].page_url == "https://p.example/a" and np.array_equal(samples[0].image, RED)
  assert samples[0].key.endswith("_000000000") and "." not in samples[0].key
  assert drops == {"zero_byte": 1}
  assert list_shards(str(tmp_path)) == shards  # found inside a parent folder too


def test_list_shards(tmp_path):
  for name in ("00001.tar", "00000.tar", "notes.txt", "x.parquet"):
    (tmp_path / name).write_bytes(b"")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "00002.tar").write_bytes(b"")
  assert list_shards(str(tmp_path)) == [str(tmp_path / n) for n in
                                        ("00000.tar", "00001.tar", "x.parquet")]
  assert list_shards(str(tmp_path / "*.tar")) == [str(tmp_path / "00000.tar"),
                                                  str(tmp_path / "00001.tar")]
  assert list_shards(str(tmp_path / "00001.tar")) == [str(tmp_path / "00001.tar")]
  for bad in (str(tmp_path / "nothing*.tar"), str(tmp_path / "notes.txt"),
              str(tmp_path / "missing")):
    with pytest.raises(ValueError, match="no input shards"):
      list_shards(bad)
  with pytest.raises(ValueError, match="not a shard"):
    list(iter_shard(str(tmp_path / "notes.txt"), collections.Counter()))
  assert sources.RawSample.__dataclass_fields__.keys() == {
      "key", "image", "caption", "url", "page_url", "meta", "source"}
