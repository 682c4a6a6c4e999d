"""The toy world: drawable subjects in recognisable contexts, rendered deterministically with numpy.

A subject's identity is shape x body colour x pattern x pattern colour (2,960 identities); its
shape is its *class* ("ball", "kite", ...), the only thing prompts name, as DreamBench names a
subject by its class. A context is where and how the subject is shown: background, position,
size, style, accessory, plus a `variant` number that jitters pose and background texture.

Everything is a pure function of its arguments: the same subject and context always give the same
pixels, and the train / held-out split is a fixed hash of the identity.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from suti.core.hashing import stable_int

# Shapes are named as object classes; each is drawn from an implicit function on [-1, 1]^2.
SHAPES: tuple[str, ...] = ("ball", "box", "tent", "starfish", "donut", "kite", "egg", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (250, 215, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
    "pink": (250, 130, 190),
    "white": (245, 245, 245),
    "black": (30, 30, 30),
    "brown": (130, 80, 40),
}
PATTERNS: tuple[str, ...] = ("plain", "stripes", "dots", "checks", "half")
BACKGROUNDS: tuple[str, ...] = ("beach", "grass", "snow", "night", "sky", "ocean", "city", "room")
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.52), "left": (0.3, 0.52), "right": (0.7, 0.52), "top": (0.5, 0.32),
    "bottom": (0.5, 0.7),
}
SIZES: dict[str, float] = {"small": 0.2, "medium": 0.29, "large": 0.38}  # half extent / image side
STYLES: tuple[str, ...] = ("photo", "sketch", "black and white")
ACCESSORIES: tuple[str, ...] = ("none", "hat", "crown", "sunglasses")
SPLITS: tuple[str, ...] = ("train", "heldout")
HELDOUT_PERCENT = 20
SIZES_PX: tuple[int, ...] = (16, 32, 64)

# Phrases for captions and prompts ("a red ball ... on the beach").
BACKGROUND_PHRASES: dict[str, str] = {
    "beach": "on the beach", "grass": "on the grass", "snow": "in the snow", "night": "at night",
    "sky": "in the sky", "ocean": "floating in the ocean", "city": "in the city",
    "room": "in a room",
}
ACCESSORY_PHRASES: dict[str, str] = {
    "hat": "wearing a hat", "crown": "wearing a crown", "sunglasses": "wearing sunglasses",
}
PATTERN_PHRASES: dict[str, str] = {
    "stripes": "with {c} stripes", "dots": "with {c} dots", "checks": "with {c} checks",
    "half": "with a {c} top half",
}
USELESS_CAPTIONS: tuple[str, ...] = (
    "IMG_{n:04d}", "DSC{n:05d}.JPG", "product photo", "click to enlarge", "image", "photo {n}",
    "thumbnail", "new arrival", "best seller", "sale", "untitled", "",
)


@dataclasses.dataclass(frozen=True, order=True)
class Subject:
  """One identity. `pattern_colour` is None exactly when `pattern` is "plain"."""
  shape: str
  body: str
  pattern: str = "plain"
  pattern_colour: str | None = None

  def __post_init__(self):
    if self.shape not in SHAPES:
      raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
    if self.body not in COLOURS:
      raise ValueError(f"unknown colour {self.body!r}; expected one of {tuple(COLOURS)}")
    if self.pattern not in PATTERNS:
      raise ValueError(f"unknown pattern {self.pattern!r}; expected one of {PATTERNS}")
    if (self.pattern == "plain") != (self.pattern_colour is None):
      raise ValueError("pattern_colour must be None for a plain subject and set otherwise")
    if self.pattern_colour is not None and (
        self.pattern_colour not in COLOURS or self.pattern_colour == self.body):
      raise ValueError(f"bad pattern colour {self.pattern_colour!r} for body {self.body!r}")

  @property
  def id(self) -> str:
    """A stable name without dots or spaces, e.g. "ball-red-stripes-white", usable as a folder."""
    parts = [self.shape, self.body, self.pattern]
    if self.pattern_colour is not None:
      parts.append(self.pattern_colour)
    return "-".join(parts)

  @property
  def cls(self) -> str:
    """The class a prompt may name (the shape)."""
    return self.shape

  @classmethod
  def from_id(cls, subject_id: str) -> "Subject":
    parts = subject_id.split("-")
    if len(parts) == 3 and parts[2] == "plain":
      return cls(parts[0], parts[1])
    if len(parts) == 4:
      return cls(*parts)
    raise ValueError(f"not a toy subject id: {subject_id!r}")


@dataclasses.dataclass(frozen=True)
class Context:
  """Where and how a subject is shown. `variant` jitters pose and background texture."""
  background: str = "grass"
  position: str = "center"
  size: str = "medium"
  style: str = "photo"
  accessory: str = "none"
  variant: int = 0

  def __post_init__(self):
    for name, value, allowed in (
        ("background", self.background, BACKGROUNDS), ("position", self.position, tuple(POSITIONS)),
        ("size", self.size, tuple(SIZES)), ("style", self.style, STYLES),
        ("accessory", self.accessory, ACCESSORIES)):
      if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def all_subjects() -> list[Subject]:
  """Every identity, in a fixed order (2,960 of them)."""
  out = []
  for shape in SHAPES:
    for body in COLOURS:
      out.append(Subject(shape, body))
      for pattern in PATTERNS[1:]:
        for pcol in COLOURS:
          if pcol != body:
            out.append(Subject(shape, body, pattern, pcol))
  return out


def _stable_hash(text: str) -> int:
  return stable_int(text)


def split_of(subject: Subject) -> str:
  """"heldout" for a fixed ~20% of identities (a hash of the id), "train" for the rest."""
  return "heldout" if _stable_hash("split:" + subject.id) % 100 < HELDOUT_PERCENT else "train"


def subjects_of_split(split: str) -> list[Subject]:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  return [s for s in all_subjects() if split_of(s) == split]


def sample_context(rng: np.random.Generator, *, style_p: float = 0.15,
                   accessory_p: float = 0.15) -> Context:
  """A random context: mostly photos without accessories, as on real product pages."""
  style = "photo"
  if rng.random() < style_p:
    style = str(rng.choice(STYLES[1:]))
  accessory = "none"
  if rng.random() < accessory_p:
    accessory = str(rng.choice(ACCESSORIES[1:]))
  return Context(
      background=str(rng.choice(BACKGROUNDS)), position=str(rng.choice(list(POSITIONS))),
      size=str(rng.choice(list(SIZES))), style=style, accessory=accessory,
      variant=int(rng.integers(0, 1 << 16)))


# ----------------------------------------------------------------------------------------------
# Text.

def describe_subject(subject: Subject) -> str:
  """"red ball with white stripes" (no article)."""
  text = f"{subject.body} {subject.shape}"
  if subject.pattern != "plain":
    text += " " + PATTERN_PHRASES[subject.pattern].format(c=subject.pattern_colour)
  return text


def describe(subject: Subject, context: Context | None = None, *,
             rng: np.random.Generator | None = None) -> str:
  """A descriptive caption, e.g. "a red ball with white stripes on the beach".

  Without `rng` the wording is canonical; with it, the template varies ("photo of ...").
  """
  body = describe_subject(subject)
  if context is not None:
    if context.size != "medium" and (rng is None or rng.random() < 0.5):
      body = f"{context.size} {body}"
    if context.accessory != "none":
      body += " " + ACCESSORY_PHRASES[context.accessory]
    body += " " + BACKGROUND_PHRASES[context.background]
  text = f"a {body}"
  if context is not None and context.style == "sketch":
    text = f"a sketch of {text}"
  elif context is not None and context.style == "black and white":
    text = f"a black and white photo of {text}"
  elif rng is not None and rng.random() < 0.3:
    text = str(rng.choice(["a photo of ", "a picture of ", "product shot: "])) + text
  return text


def useless_caption(rng: np.random.Generator) -> str:
  """Alt text that says nothing about the subject ("IMG_0042", "click to enlarge")."""
  template = str(rng.choice(USELESS_CAPTIONS))
  return template.format(n=int(rng.integers(0, 10000)))


def prompt_for(cls: str, context: Context, token: str | None = None) -> str:
  """A prompt naming the subject only by class: "a sks ball wearing a hat on the beach"."""
  if cls not in SHAPES:
    raise ValueError(f"unknown class {cls!r}; expected one of {SHAPES}")
  name = f"{token} {cls}" if token else cls
  if context.size != "medium":
    name = f"{context.size} {name}"
  if context.accessory != "none":
    name += " " + ACCESSORY_PHRASES[context.accessory]
  text = f"a {name} {BACKGROUND_PHRASES[context.background]}"
  if context.style == "sketch":
    text = f"a sketch of {text}"
  elif context.style == "black and white":
    text = f"a black and white photo of {text}"
  return text


def benchmark_contexts() -> list[Context]:
  """The fixed contexts behind the benchmark prompts (DreamBench-like: mostly recontextualization,
  then accessorization and style)."""
  out = [Context(background=b) for b in BACKGROUNDS]
  out += [Context(background=b, accessory=a) for b, a in
          (("beach", "hat"), ("snow", "crown"), ("grass", "sunglasses"), ("room", "hat"),
           ("city", "sunglasses"), ("sky", "crown"))]
  out += [Context(background=b, style=s) for b, s in
          (("grass", "sketch"), ("beach", "sketch"), ("snow", "black and white"),
           ("city", "black and white"))]
  out += [Context(background=b, size=z) for b, z in
          (("beach", "small"), ("room", "large"), ("night", "large"), ("ocean", "small"))]
  out += [Context(background="sky", size="large", accessory="hat"),
          Context(background="night", accessory="crown", style="sketch"),
          Context(background="grass", accessory="hat", style="black and white")]
  return out


def benchmark_prompts(cls: str, token: str | None = "sks") -> list[str]:
  """25 prompts for a subject of class `cls`, naming it only as "{token} {cls}"."""
  return [prompt_for(cls, c, token) for c in benchmark_contexts()]


def prompt_context(prompt: str) -> Context:
  """Read back the context a prompt asks for (background, accessory, style, size); the parts it
  does not name keep their defaults. Used to score context accuracy of generated images."""
  text = prompt.lower()
  background = next((b for b, p in BACKGROUND_PHRASES.items() if p in text), "grass")
  accessory = next((a for a, p in ACCESSORY_PHRASES.items() if p in text), "none")
  style = "photo"
  if "sketch" in text:
    style = "sketch"
  elif "black and white" in text:
    style = "black and white"
  words = set(re.findall(r"[a-z]+", text))
  size = "small" if "small" in words else ("large" if "large" in words else "medium")
  return Context(background=background, size=size, style=style, accessory=accessory)


# ----------------------------------------------------------------------------------------------
# Rendering.

def _supersampling(size: int) -> int:
  return 4 if size <= 32 else 3


def _grid(size: int, ss: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates in [0, 1] of the supersampled image: (y, x), each [S, S]."""
  n = size * ss
  c = (np.arange(n, dtype=np.float32) + 0.5) / n
  return np.meshgrid(c, c, indexing="ij")


def _value_noise(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, cells: int) -> np.ndarray:
  """Smooth noise in [0, 1]: bilinear interpolation of a random lattice."""
  lattice = rng.random((cells + 1, cells + 1), dtype=np.float32)
  gy, gx = y * cells, x * cells
  iy, ix = np.minimum(gy.astype(int), cells - 1), np.minimum(gx.astype(int), cells - 1)
  fy, fx = gy - iy, gx - ix
  fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
  top = lattice[iy, ix] * (1 - fx) + lattice[iy, ix + 1] * fx
  bottom = lattice[iy + 1, ix] * (1 - fx) + lattice[iy + 1, ix + 1] * fx
  return top * (1 - fy) + bottom * fy


def _mix(base: np.ndarray, colour, weight: np.ndarray) -> np.ndarray:
  w = weight[..., None]
  return base * (1 - w) + np.asarray(colour, np.float32) * w


def _background(name: str, y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """An RGB float image (0..255) of a recognisable scene."""
  h = y.shape[0]
  img = np.zeros(y.shape + (3,), np.float32)
  noise = _value_noise(rng, y, x, 6)
  fine = _value_noise(rng, y, x, 24)
  if name == "beach":
    horizon = 0.42 + 0.03 * (noise - 0.5)
    sea = _mix(np.broadcast_to(np.float32([70, 150, 215]), img.shape), (30, 100, 180), y / 0.5)
    sand = _mix(np.broadcast_to(np.float32([238, 214, 160]), img.shape), (215, 185, 125), fine)
    img = np.where((y < horizon)[..., None], sea, sand)
    foam = np.abs(y - horizon) < 0.02
    img = _mix(img, (250, 250, 245), foam.astype(np.float32) * 0.8)
  elif name == "grass":
    img = _mix(np.broadcast_to(np.float32([70, 155, 55]), img.shape), (40, 110, 35), noise)
    blades = (np.sin(x * 90 + 6 * fine) > 0.6) & (fine > 0.45)
    img = _mix(img, (110, 190, 80), blades.astype(np.float32) * 0.6)
  elif name == "snow":
    img = _mix(np.broadcast_to(np.float32([242, 246, 252]), img.shape), (200, 210, 228), noise * 0.7)
    flakes = rng.random(y.shape, dtype=np.float32) > 0.995
    img = _mix(img, (255, 255, 255), flakes.astype(np.float32))
  elif name == "night":
    img = _mix(np.broadcast_to(np.float32([10, 14, 45]), img.shape), (25, 30, 80), y)
    stars = rng.random(y.shape, dtype=np.float32) > 0.996
    img = _mix(img, (255, 255, 220), stars.astype(np.float32))
    mx, my = 0.8 + 0.1 * rng.random(), 0.15 + 0.05 * rng.random()
    moon = np.clip((0.09 - np.hypot(x - mx, y - my)) * h * 0.5, 0, 1)
    img = _mix(img, (245, 240, 200), moon)
  elif name == "sky":
    img = _mix(np.broadcast_to(np.float32([110, 175, 240]), img.shape), (185, 220, 250), y)
    clouds = np.clip((noise - 0.55) * 5, 0, 1)
    img = _mix(img, (250, 250, 252), clouds)
  elif name == "ocean":
    img = _mix(np.broadcast_to(np.float32([25, 85, 160]), img.shape), (10, 45, 110), y)
    waves = (np.sin(y * 70 + 4 * np.sin(x * 12 + 5 * noise)) > 0.85).astype(np.float32)
    img = _mix(img, (140, 200, 235), waves * 0.7)
  elif name == "city":
    img = _mix(np.broadcast_to(np.float32([175, 180, 190]), img.shape), (140, 145, 155), y)
    n_buildings = 7
    heights = 0.15 + 0.45 * rng.random(n_buildings)
    col = np.minimum((x * n_buildings).astype(int), n_buildings - 1)
    building = y > heights[col]
    shade = (col % 2).astype(np.float32)
    facade = _mix(np.broadcast_to(np.float32([85, 85, 100]), img.shape), (60, 60, 75), shade)
    windows = ((np.sin(x * 160) > 0.4) & (np.sin(y * 160) > 0.4)).astype(np.float32)
    facade = _mix(facade, (230, 210, 120), windows * 0.6)
    img = np.where(building[..., None], facade, img)
    road = y > 0.82
    img = np.where(road[..., None], np.float32([70, 70, 72]), img)
  elif name == "room":
    wall = _mix(np.broadcast_to(np.float32([232, 218, 192]), img.shape), (215, 200, 172), noise)
    floor = _mix(np.broadcast_to(np.float32([150, 95, 55]), img.shape), (120, 75, 40), fine)
    planks = (np.sin(x * 50) > 0.92).astype(np.float32)
    floor = _mix(floor, (90, 55, 30), planks * 0.7)
    img = np.where((y < 0.6)[..., None], wall, floor)
  else:
    raise ValueError(f"unknown background {name!r}")
  return img


def _shape_inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Boolean mask of the shape in local coordinates (u right, v down, extent about [-1, 1])."""
  if shape == "ball":
    return u * u + v * v <= 0.92 ** 2
  if shape == "box":
    return (np.abs(u) <= 0.78) & (np.abs(v) <= 0.78)
  if shape == "tent":
    return (v <= 0.8) & (v >= -0.9) & (np.abs(u) <= (v + 0.9) / 1.7 * 0.95)
  if shape == "starfish":
    r = np.hypot(u, v)
    theta = np.arctan2(u, -v)  # 0 points up
    k = np.abs(((theta * 5 / (2 * np.pi)) % 1.0) - 0.5) * 2  # 1 at an arm, 0 between arms
    return r <= 0.42 + 0.56 * k ** 1.6
  if shape == "donut":
    r2 = u * u + v * v
    return (r2 <= 0.95 ** 2) & (r2 >= 0.45 ** 2)
  if shape == "kite":
    return np.abs(u) / 0.68 + np.abs(v) / 0.98 <= 1
  if shape == "egg":
    vv = v / (0.95 - 0.12 * v)  # narrower at the top
    return (u / 0.66) ** 2 + vv ** 2 <= 1
  if shape == "heart":
    a, b = u / 0.95, -(v - 0.05) / 0.95 * 1.15
    return (a * a + b * b - 1) ** 3 - a * a * b ** 3 <= 0
  raise ValueError(f"unknown shape {shape!r}")


def _pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Where the pattern colour replaces the body colour, in the subject's own coordinates."""
  if pattern == "plain":
    return np.zeros(u.shape, bool)
  if pattern == "stripes":
    return (np.floor((v + 1) * 2.5) % 2) == 1
  if pattern == "dots":
    cu = (u + 1) / 0.66
    cv = (v + 1) / 0.66
    du, dv = cu - np.floor(cu) - 0.5, cv - np.floor(cv) - 0.5
    return du * du + dv * dv <= 0.27 ** 2
  if pattern == "checks":
    return ((np.floor((u + 1) * 2) + np.floor((v + 1) * 2)) % 2) == 1
  if pattern == "half":
    return v < 0
  raise ValueError(f"unknown pattern {pattern!r}")


def _accessory(name: str, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mask, RGB colour per pixel) of an accessory in the subject's coordinates."""
  colour = np.zeros(u.shape + (3,), np.float32)
  if name == "hat":
    brim = (np.abs(u) <= 0.75) & (v >= -1.02) & (v <= -0.88)
    crown = (np.abs(u) <= 0.45) & (v >= -1.75) & (v < -1.0)
    band = crown & (v >= -1.2)
    colour[:] = (25, 25, 30)
    colour[band] = (200, 30, 30)
    return brim | crown, colour
  if name == "crown":
    base = (np.abs(u) <= 0.6) & (v >= -1.15) & (v <= -0.85)
    teeth_height = -1.15 - 0.5 * (1 - np.abs(((u + 0.6) / 0.3) % 2 - 1))
    teeth = (np.abs(u) <= 0.6) & (v < -1.15) & (v >= teeth_height)
    colour[:] = (250, 200, 30)
    return base | teeth, colour
  if name == "sunglasses":
    lens = ((u - 0.35) ** 2 + (v + 0.15) ** 2 <= 0.25 ** 2) | ((u + 0.35) ** 2 + (v + 0.15) ** 2
                                                              <= 0.25 ** 2)
    bridge = (np.abs(u) <= 0.2) & (np.abs(v + 0.2) <= 0.05)
    colour[:] = (10, 10, 15)
    return lens | bridge, colour
  if name == "none":
    return np.zeros(u.shape, bool), colour
  raise ValueError(f"unknown accessory {name!r}")


def _downsample(img: np.ndarray, ss: int) -> np.ndarray:
  n = img.shape[0] // ss
  return img.reshape(n, ss, n, ss, -1).mean(axis=(1, 3))


def _to_gray(img: np.ndarray) -> np.ndarray:
  return img @ np.float32([0.299, 0.587, 0.114])


def render(subject: Subject, context: Context | None = None, size: int = 32) -> np.ndarray:
  """The subject in the context as a uint8 [size, size, 3] RGB image (deterministic)."""
  if size not in SIZES_PX:
    raise ValueError(f"image size must be one of {SIZES_PX}, got {size}")
  context = context or Context()
  rng = np.random.default_rng(_stable_hash(f"{context.background}:{context.variant}"))
  ss = _supersampling(size)
  y, x = _grid(size, ss)
  img = _background(context.background, y, x, rng)

  # Pose: position and size from the context, a small jitter and tilt from the variant.
  pose = np.random.default_rng(_stable_hash(f"pose:{context.variant}"))
  radius = SIZES[context.size] * (1 + 0.08 * (pose.random() - 0.5))
  cx, cy = POSITIONS[context.position]
  cx += 0.04 * (pose.random() - 0.5)
  cy += 0.04 * (pose.random() - 0.5)
  margin = radius * 1.02
  top_room = radius * (1.8 if context.accessory in ("hat", "crown") else 1.02)
  cx = float(np.clip(cx, margin, 1 - margin))
  cy = float(np.clip(cy, top_room, 1 - margin))
  angle = np.deg2rad(24 * (pose.random() - 0.5))
  dx, dy = (x - cx) / radius, (y - cy) / radius
  u = np.cos(angle) * dx + np.sin(angle) * dy
  v = -np.sin(angle) * dx + np.cos(angle) * dy

  # A soft shadow on the ground under the subject.
  shadow = ((x - cx) / (radius * 1.0)) ** 2 + ((y - cy - radius * 0.95) / (radius * 0.22)) ** 2
  img = _mix(img, (0, 0, 0), np.clip(1 - shadow, 0, 1) * 0.35)

  inside = _shape_inside(subject.shape, u, v)
  core = _shape_inside(subject.shape, u * 1.1, v * 1.1)  # shrunk copy: the rest is the outline
  body = np.asarray(COLOURS[subject.body], np.float32)
  subject_rgb = np.broadcast_to(body, img.shape).copy()
  if subject.pattern_colour is not None:
    pmask = _pattern_mask(subject.pattern, u, v)
    subject_rgb[pmask] = COLOURS[subject.pattern_colour]
  shade = np.clip(1.08 - 0.12 * (u + v), 0.85, 1.15)[..., None]  # light from the top left
  subject_rgb = np.clip(subject_rgb * shade, 0, 255)
  outline = body * 0.45
  subject_rgb[inside & ~core] = outline
  img = np.where(inside[..., None], subject_rgb, img)

  acc_mask, acc_rgb = _accessory(context.accessory, u, v)
  img = np.where(acc_mask[..., None], acc_rgb, img)

  if context.style == "black and white":
    g = _to_gray(img)
    img = np.repeat(g[..., None], 3, axis=-1)
  elif context.style == "sketch":
    g = _to_gray(img)
    edges = np.zeros_like(g)
    edges[1:, :] += np.abs(g[1:, :] - g[:-1, :])
    edges[:, 1:] += np.abs(g[:, 1:] - g[:, :-1])
    ink = np.clip(edges / (12.0 / ss * 4), 0, 1)
    paper = np.broadcast_to(np.float32([246, 243, 232]), img.shape)
    wash = _mix(paper, img, (inside | acc_mask).astype(np.float32) * 0.35)
    img = _mix(wash, (50, 50, 60), ink)
  out = _downsample(img, ss)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)
