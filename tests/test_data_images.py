"""Images deeper than 8 bits are scaled by their bit depth, not clipped, when read and when converted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ahl.data import converters, mvtec
from ahl.data.mvtec import load_image, to_8bit

RAMP = np.arange(256)


def _ramp(dtype, top: float) -> np.ndarray:
    """A 16 x 256 horizontal ramp from 0 to ``top``: column j holds j / 255 * top."""
    return np.tile((RAMP / 255 * top).astype(dtype)[None, :], (16, 1))


def test_a_16_bit_png_keeps_its_gradient(tmp_path: Path) -> None:
    path = tmp_path / "grey16.png"
    Image.fromarray(_ramp(np.uint16, 65535)).save(path)
    assert Image.open(path).mode == "I;16"
    image = load_image(path, 256)
    assert image.dtype == np.uint8 and image.shape == (256, 256, 3)
    assert np.array_equal(image[0, :, 0], RAMP)  # not all 255, as PIL's convert("RGB") makes it
    assert np.array_equal(image[..., 0], image[..., 2])


@pytest.mark.parametrize(
    "array",
    [_ramp(np.uint16, 65535), _ramp(np.int32, 65535), _ramp(np.float32, 1.0), _ramp(np.float32, 65535.0)],
    ids=["I;16", "I (16-bit values)", "F in 0..1", "F in 0..65535"],
)
def test_to_8bit_scales_by_the_depth(array: np.ndarray) -> None:
    grey = np.asarray(to_8bit(Image.fromarray(array)))
    assert grey.dtype == np.uint8
    assert np.abs(grey[0].astype(int) - RAMP).max() <= 1


def test_to_8bit_full_32_bit_range_and_unchanged_8_bit() -> None:
    wide = np.asarray(to_8bit(Image.fromarray(_ramp(np.int64, 2**31 - 1).astype(np.int32))))
    assert np.abs(wide[0].astype(int) - RAMP).max() <= 1
    rgb = Image.new("RGB", (4, 4), (1, 2, 3))
    assert to_8bit(rgb) is rgb


def test_converted_tiles_of_a_16_bit_image_are_8_bit(tmp_path: Path) -> None:
    tile = Image.fromarray(_ramp(np.uint16, 65535)).crop((0, 0, 256, 8))
    converters._save_png(tile, tmp_path / "tile.png")
    with Image.open(tmp_path / "tile.png") as img:
        assert img.mode == "L" and np.array_equal(np.asarray(img)[0], RAMP)


def test_one_list_of_image_suffixes() -> None:
    assert converters.IMAGE_SUFFIXES is mvtec.IMAGE_SUFFIXES


def test_mvtec_layout_16_bit_images_are_scaled_and_masks_kept(tmp_path: Path) -> None:
    category = tmp_path / "raw" / "toy"
    for folder in ("train/good", "test/good", "test/dent", "ground_truth/dent"):
        (category / folder).mkdir(parents=True)
    Image.fromarray(_ramp(np.uint8, 255)).save(category / "train/good/000.png")  # 8 bits: linked
    Image.fromarray(_ramp(np.uint8, 255)).save(category / "test/good/000.png")
    Image.fromarray(_ramp(np.uint16, 65535)).save(category / "test/dent/000.png")
    mask = np.zeros((16, 256), np.uint16)
    mask[4:8, 10:20] = 1  # a 16-bit mask of 0/1: scaling it would erase the defect
    Image.fromarray(mask).save(category / "ground_truth/dent/000_mask.png")
    converters.convert_mvtec(tmp_path / "raw", tmp_path / "out")
    out = tmp_path / "out" / "toy"
    with Image.open(out / "test/dent/000.png") as img:
        assert img.mode == "L" and np.array_equal(np.asarray(img)[0], RAMP)
    assert np.array_equal(np.asarray(Image.open(out / "ground_truth/dent/000_mask.png")), mask)
    assert (out / "train/good/000.png").stat().st_ino == (category / "train/good/000.png").stat().st_ino
