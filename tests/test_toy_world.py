"""The toy world: identities, split rule, deterministic rendering, captions and prompts."""
import collections
import hashlib

import numpy as np
import pytest

from suti.toy import world as tw


def test_identity_count_and_uniqueness():
  subjects = tw.all_subjects()
  # shape x body x (plain + 4 patterns x 9 other colours)
  assert len(subjects) == len(tw.SHAPES) * len(tw.COLOURS) * (1 + 4 * (len(tw.COLOURS) - 1))
  assert len({s.id for s in subjects}) == len(subjects)
  for s in subjects[:50]:
    assert tw.Subject.from_id(s.id) == s
    assert "." not in s.id and " " not in s.id


def test_split_rule_is_fixed_and_covers_every_class():
  subjects = tw.all_subjects()
  heldout = [s for s in subjects if tw.split_of(s) == "heldout"]
  # The rule is a hash of the id, so the split is fixed across runs and machines.
  expected = [s for s in subjects
              if int.from_bytes(hashlib.sha256(("split:" + s.id).encode()).digest()[:8], "big")
              % 100 < 20]
  assert heldout == expected
  assert 0.15 < len(heldout) / len(subjects) < 0.25
  per_class = collections.Counter(s.cls for s in heldout)
  assert set(per_class) == set(tw.SHAPES) and min(per_class.values()) >= 20
  assert tw.subjects_of_split("train") + heldout != []
  assert len(tw.subjects_of_split("train")) + len(heldout) == len(subjects)


@pytest.mark.parametrize("size", tw.SIZES_PX)
def test_render_is_deterministic_and_well_formed(size):
  s = tw.Subject("starfish", "red", "stripes", "white")
  c = tw.Context("beach", "left", "large", "photo", "hat", 7)
  a, b = tw.render(s, c, size), tw.render(s, c, size)
  assert a.dtype == np.uint8 and a.shape == (size, size, 3)
  assert np.array_equal(a, b)


def test_render_depends_on_identity_and_context():
  s = tw.Subject("ball", "red")
  base = tw.render(s, tw.Context(), 32)
  assert not np.array_equal(base, tw.render(tw.Subject("ball", "blue"), tw.Context(), 32))
  assert not np.array_equal(base, tw.render(tw.Subject("box", "red"), tw.Context(), 32))
  assert not np.array_equal(base, tw.render(tw.Subject("ball", "red", "dots", "white"),
                                            tw.Context(), 32))
  assert not np.array_equal(base, tw.render(s, tw.Context(background="night"), 32))
  assert not np.array_equal(base, tw.render(s, tw.Context(accessory="crown"), 32))


def test_body_colour_is_visible_at_the_centre():
  c = tw.Context(background="grass", size="large", variant=3)
  img = tw.render(tw.Subject("box", "blue"), c, 32).astype(int)
  centre = img[12:20, 12:20].reshape(-1, 3).mean(0)
  assert centre[2] > 150 and centre[0] < 100  # blue dominates where the box is


def test_black_and_white_style_is_gray():
  img = tw.render(tw.Subject("heart", "pink"), tw.Context(style="black and white"), 32)
  assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])


def test_captions_and_prompts():
  s = tw.Subject("ball", "red", "stripes", "white")
  assert tw.describe(s, tw.Context("beach")) == "a red ball with white stripes on the beach"
  assert tw.describe(s) == "a red ball with white stripes"
  c = tw.Context("snow", accessory="hat", style="sketch")
  assert tw.describe(s, c) == "a sketch of a red ball with white stripes wearing a hat in the snow"
  prompt = tw.prompt_for("ball", c, "sks")
  assert prompt == "a sketch of a sks ball wearing a hat in the snow"
  # Prompts name the class only, never the identity.
  prompts = tw.benchmark_prompts("kite")
  assert len(prompts) == 25 and len(set(prompts)) == 25
  for p in prompts:
    words = p.split()
    i = words.index("sks")
    assert words[i + 1] == "kite" and words[i - 1] not in tw.COLOURS
    assert not {"stripes", "dots", "checks", "half"} & set(words)
  # A prompt reads back to the context that made it.
  for ctx in tw.benchmark_contexts():
    back = tw.prompt_context(tw.prompt_for("egg", ctx))
    assert (back.background, back.accessory, back.style, back.size) == (
        ctx.background, ctx.accessory, ctx.style, ctx.size)


def test_useless_captions_do_not_describe():
  rng = np.random.default_rng(0)
  for _ in range(50):
    text = tw.useless_caption(rng).lower()
    assert not any(shape in text for shape in tw.SHAPES)
    assert not any(colour in text.split() for colour in tw.COLOURS)


def test_bad_values_raise_clear_errors():
  with pytest.raises(ValueError, match="unknown shape"):
    tw.Subject("spaceship", "red")
  with pytest.raises(ValueError, match="pattern_colour"):
    tw.Subject("ball", "red", "stripes")
  with pytest.raises(ValueError, match="bad pattern colour"):
    tw.Subject("ball", "red", "stripes", "red")
  with pytest.raises(ValueError, match="unknown background"):
    tw.Context(background="moon")
  with pytest.raises(ValueError, match="image size"):
    tw.render(tw.Subject("ball", "red"), tw.Context(), 48)
