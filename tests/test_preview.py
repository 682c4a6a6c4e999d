"""Sample grids: exact tile placement, gray padded demos, the base-model grid, captions, and the PNG round trip."""
import os

import numpy as np
import pytest
from PIL import Image

from suti.core.image_ops import to_uint8
from suti.viz.contact_sheet import PADDED_TILE_GRAY as PADDED_DEMO_GRAY
from suti.viz.contact_sheet import SEPARATOR_COLOR
from suti.viz.sample_grid import sample_grid, sample_grid_path, save_sample_grid

WHITE = (255, 255, 255)


def _distinct_images(shape, seed):
  """uint8 images whose pixels are all different from each other (and never all zero)."""
  rng = np.random.default_rng(seed)
  return rng.integers(1, 255, size=shape, dtype=np.uint8)


def _paste(canvas, image, y, x, scale):
  for i in range(image.shape[0]):
    for j in range(image.shape[1]):
      canvas[y + i * scale:y + (i + 1) * scale, x + j * scale:x + (j + 1) * scale] = image[i, j]


def test_apprentice_rows_place_demos_separator_and_output_exactly():
  n, k, h, w, scale, g, sep = 2, 3, 3, 5, 2, 2, 4  # H != W catches a transposed layout
  outputs, demos = _distinct_images((n, h, w, 3), 0), _distinct_images((n, k, h, w, 3), 1)
  mask = np.array([[True, True, True], [True, False, False]])  # row 1: one real demo, two padded
  grid = sample_grid(outputs, demos, scale=scale, demo_mask=mask, gutter=g, separator=sep)

  th, tw = h * scale, w * scale
  output_x = g + k * (tw + g) + sep + g
  expected = np.full((g + n * (th + g), output_x + tw + g, 3), 255, np.uint8)
  for r in range(n):
    y = g + r * (th + g)
    for j in range(k):
      if mask[r, j]:
        _paste(expected, demos[r, j], y, g + j * (tw + g), scale)
      else:
        expected[y:y + th, g + j * (tw + g):g + j * (tw + g) + tw] = PADDED_DEMO_GRAY
    expected[y:y + th, g + k * (tw + g):g + k * (tw + g) + sep] = SEPARATOR_COLOR
    _paste(expected, outputs[r], y, output_x, scale)

  assert grid.dtype == np.uint8 and grid.shape == (2 + 2 * (6 + 2), 2 + 3 * 12 + 4 + 2 + 10 + 2, 3) == expected.shape
  np.testing.assert_array_equal(grid, expected)
  # A known output pixel (row 1, pixel (2, 4)) lands at the expected place, right of the separator.
  y, x = g + 1 * (th + g) + 2 * scale, output_x + 4 * scale
  np.testing.assert_array_equal(grid[y:y + scale, x:x + scale], np.broadcast_to(outputs[1, 2, 4], (scale, scale, 3)))


def test_floats_in_minus_one_one_map_to_uint8_and_zero_demos_count_as_padding():
  assert to_uint8(np.array([-1.0, 0.0, 0.5, 1.0, -3.0, 7.0, np.nan])).tolist() == [0, 128, 191, 255, 0, 255, 128]
  outputs = np.ones((1, 2, 2, 3), np.float32)  # white
  demos = np.zeros((1, 2, 2, 2, 3), np.uint8)
  demos[0, 0] = 200  # demo 1 is all-zero: padding, shown gray rather than black
  grid = sample_grid(outputs, demos, scale=1, gutter=1, separator=1)
  assert grid.shape == (4, 1 + 2 * 3 + 1 + 1 + 2 + 1, 3)
  assert (grid[1:3, 1:3] == 200).all() and (grid[1:3, 4:6] == PADDED_DEMO_GRAY).all()
  assert (grid[1:3, 7] == SEPARATOR_COLOR).all() and (grid[1:3, 9:11] == 255).all()


def test_base_grid_is_near_square_with_outputs_in_reading_order():
  n, h, scale, g = 5, 4, 3, 2
  outputs = _distinct_images((n, h, h, 3), 2)
  grid = sample_grid(outputs, scale=scale, gutter=g)
  t = h * scale
  assert grid.shape == (g + 2 * (t + g), g + 3 * (t + g), 3)  # 5 outputs -> 3 columns x 2 rows
  for i in range(n):
    y, x = g + (i // 3) * (t + g), g + (i % 3) * (t + g)
    np.testing.assert_array_equal(grid[y:y + t, x:x + t], np.repeat(np.repeat(outputs[i], scale, 0), scale, 1))
  assert (grid[g + t + g:, g + 2 * (t + g):] == 255).all()  # the sixth cell stays empty
  assert sample_grid(outputs[:4], scale=1, gutter=0).shape == (8, 8, 3)  # 4 -> 2 x 2


def test_captions_add_a_band_under_each_row_and_long_ones_stay_inside():
  outputs, demos = _distinct_images((2, 4, 4, 3), 3), _distinct_images((2, 3, 4, 4, 3), 4)
  plain = sample_grid(outputs, demos, scale=2)
  captioned = sample_grid(outputs, demos, scale=2, captions=["a red teapot on the beach " * 20, ""])
  band = (captioned.shape[0] - plain.shape[0]) // 2
  assert band > 0 and captioned.shape[1] == plain.shape[1]
  # Tiles keep their x positions; each row moves down by the bands above it.
  np.testing.assert_array_equal(captioned[2:10], plain[2:10])
  np.testing.assert_array_equal(captioned[2 + 8 + band + 2:][:8], plain[2 + 8 + 2:][:8])
  first_band, second_band = captioned[10:10 + band], captioned[10 + band + 2 + 8:][:band]
  assert (first_band != 255).any() and (second_band == 255).all()
  assert (captioned[:, -2:] == 255).all()  # the truncated caption does not spill into the right margin
  # Base grid: a tile's caption stays under its own tile.
  base = sample_grid(_distinct_images((2, 8, 8, 3), 6), scale=4, captions=["x" * 200, ""])
  tile_band = base[2 + 32:2 + 32 + band]
  assert (tile_band[:, 2:34] != 255).any() and (tile_band[:, 34:] == 255).all()


def test_saved_png_reads_back_equal(tmp_path):
  outputs = np.linspace(-1, 1, 2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
  demos = _distinct_images((2, 3, 4, 4, 3), 5)
  path = sample_grid_path(str(tmp_path), 120)
  assert path == os.path.join(str(tmp_path), "samples", "step_00000120.png")
  assert save_sample_grid(path, outputs, demos, captions=["one", "two"]) == path
  np.testing.assert_array_equal(np.asarray(Image.open(path)), sample_grid(outputs, demos, captions=["one", "two"]))
  assert os.listdir(os.path.dirname(path)) == ["step_00000120.png"]  # no temporary left behind


@pytest.mark.parametrize("call, message", [
    (lambda: sample_grid(np.zeros((2, 4, 4))), r"outputs must be \[N,H,W,3\]"),
    (lambda: sample_grid(np.zeros((2, 4, 4, 3), np.int32)), "outputs: images must be uint8 or floats"),
    (lambda: sample_grid(np.zeros((2, 4, 4, 3)), np.zeros((3, 3, 4, 4, 3))), r"demos must be \[N,K,H,W,3\]"),
    (lambda: sample_grid(np.zeros((2, 4, 4, 3)), np.zeros((2, 0, 4, 4, 3))), "pass demos=None"),
    (lambda: sample_grid(np.zeros((2, 4, 4, 3)), np.zeros((2, 3, 4, 4, 3)), demo_mask=np.ones((2, 2))), "demo_mask"),
    (lambda: sample_grid(np.zeros((2, 4, 4, 3)), demo_mask=np.ones((2, 3))), "without demos"),
    (lambda: sample_grid(np.zeros((2, 4, 4, 3)), scale=0), "scale must be a positive integer"),
    (lambda: sample_grid(np.zeros((2, 4, 4, 3)), captions=["one"]), "one caption per output"),
])
def test_bad_input_is_one_clear_error(call, message):
  with pytest.raises(ValueError, match=message):
    call()
