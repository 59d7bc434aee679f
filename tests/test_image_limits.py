"""Image limits of the shared preprocessing (``predict``, the Python API, the server): refuse before decoding.

A 2 KB 1x1,000,000 PNG would become a 28x28,000,000 intermediate in the resize; the size is checked
on the header, so such a file is refused before a pixel is decoded, in every path that reads images.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from freetickets_hub.cli import main
from freetickets_hub.engines.preprocessing import (
    ALLOWED_FORMATS,
    MAX_ASPECT_RATIO,
    MAX_IMAGE_PIXELS,
    MAX_RESIZE_PIXELS,
    open_image,
    preprocess,
)
from freetickets_hub.errors import ImageError

from .conftest_hub import make_ensemble
from .image_bombs import encoded, mutations, one_bit_png, real_digit

CFG = {"input_size": (1, 28, 28), "crop_pct": 1.0, "interpolation": "bilinear", "mean": (0.5,), "std": (0.5,)}


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any pixel decoded or resized fails the test: the refusal must come from the header alone."""

    def forbidden(*args, **kwargs):
        raise AssertionError("decoded or resized an image that should have been refused on its header")

    monkeypatch.setattr(Image.Image, "load", forbidden)
    monkeypatch.setattr(Image.Image, "resize", forbidden)


@pytest.mark.parametrize("size", [(1, 1_000_000), (89_000_000, 1), (10_000, 100)])
def test_an_extreme_aspect_ratio_is_refused_on_its_header(size: tuple[int, int], tmp_path: Path, no_decoding) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(one_bit_png(*size))
    with pytest.raises(ImageError, match=f"over the limit of {MAX_ASPECT_RATIO}:1"):
        preprocess([path], CFG)
    with pytest.raises(ImageError, match=f"{size[0]}x{size[1]} pixels"):
        open_image(io.BytesIO(path.read_bytes()), name="upload")


@pytest.mark.parametrize("size", [(60_000, 60_000), (12_000, 8_000), (7_000, 7_000)])
def test_too_many_pixels_is_named_as_such_on_the_header(size: tuple[int, int], no_decoding) -> None:
    """Over Pillow's own bomb limits (2x and 1x its 89 M pixels) or only over ours: the same message."""
    with pytest.raises(ImageError, match=f"^upload: the image is .*over the limit of {MAX_IMAGE_PIXELS:,} pixels"):
        open_image(io.BytesIO(one_bit_png(*size, rows=1)), name="upload")


def test_the_resize_intermediate_is_bounded_for_in_memory_images(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image.Image, "resize", lambda *a, **k: pytest.fail("resized before checking"))
    image = Image.new("L", (4000, 100))  # ratio 40:1 is allowed, but 1024 x 40,960 is over the resize limit
    with pytest.raises(ImageError, match=f"over the limit of {MAX_RESIZE_PIXELS:,} pixels"):
        preprocess([image], {**CFG, "input_size": (1, 1024, 1024)})


def test_allowed_images_still_preprocess(tmp_path: Path) -> None:
    for fmt in ALLOWED_FORMATS:
        (tmp_path / f"a.{fmt.lower()}").write_bytes(encoded(fmt, seed=1))
    pixels = preprocess(sorted(tmp_path.iterdir()), CFG)
    assert pixels.shape == (len(ALLOWED_FORMATS), 1, 28, 28) and np.isfinite(pixels).all()
    wide = preprocess([Image.new("L", (28 * MAX_ASPECT_RATIO, 28))], CFG)  # the limit itself is allowed
    assert wide.shape == (1, 1, 28, 28)


@pytest.mark.parametrize("fmt", ["DDS", "SPIDER", "ICO", "PCX"])
def test_formats_outside_the_allow_list_are_refused(fmt: str) -> None:
    blob = encoded(fmt, mode="F" if fmt == "SPIDER" else "RGB")
    for variant in (blob, *mutations(blob, seed=3, count=5)):
        with pytest.raises(ImageError, match="not a PNG, JPEG, GIF, BMP, TIFF, WEBP image"):
            open_image(io.BytesIO(variant), name="upload")


def test_an_eps_file_is_never_handed_to_ghostscript() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nshowpage\n"
    with pytest.raises(ImageError, match="not a PNG"):
        open_image(io.BytesIO(eps), name="upload")


def test_seeded_mutations_of_real_images_raise_only_image_errors() -> None:
    """Bounded offline fuzz (6 formats x 40 mutations of real digits and of noise): nothing but
    ``ImageError`` or an image comes out."""
    for i, fmt in enumerate(ALLOWED_FORMATS):
        sources = (real_digit(i, fmt, mode="RGB"), encoded(fmt, seed=i, mode="RGB"))
        for blob in (m for source in sources for m in mutations(source, seed=i, count=20)):
            try:
                image = open_image(io.BytesIO(blob), name="fuzz")
            except ImageError as err:
                assert "<_io." not in str(err), str(err)
            else:
                assert image.width * image.height > 0


def test_predict_cli_skips_a_bomb_with_a_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    saved = tmp_path / "model"
    make_ensemble(seed=1, members=2).save_pretrained(saved)
    bomb, good, tiny = tmp_path / "bomb.png", tmp_path / "good.png", tmp_path / "tiny.png"
    bomb.write_bytes(one_bit_png(1, 1_000_000))
    good.write_bytes(encoded("PNG", seed=2))
    Image.new("L", (1, 1)).save(tiny)
    assert main(["predict", str(saved), str(bomb), "--backend", "torch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "aspect ratio 1000000:1 is over the limit of 50:1" in err[0] and "skipped" in err[0]
    assert len(err) == 2 and "none of the 1 image(s)" in err[1]
    assert main(["predict", str(saved), str(bomb), str(good), str(tiny), "--backend", "torch"]) == 1  # some skipped
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "tiny.png is 1x1 pixels, far smaller" in captured.err
    rows = captured.out.splitlines()
    assert any(str(good) in row for row in rows) and not any(str(bomb) in row for row in rows)


@pytest.mark.parametrize("size", ["0", "-1"])
def test_predict_batch_size_must_be_positive(size: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", str(tmp_path), "a.png", "--batch-size", size]) == 2  # before the model is read
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--batch-size must be at least 1, got {size}" in err


def test_16_bit_images_are_scaled_not_saturated() -> None:
    gray = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    wide = Image.fromarray(gray.astype(np.uint16) * 257)  # the same picture at 16 bits (mode I;16)
    assert wide.mode.startswith("I")
    np.testing.assert_allclose(preprocess([wide], CFG), preprocess([gray], CFG), atol=1e-6)
    with pytest.raises(ImageError, match="floating-point image"):
        preprocess([Image.fromarray(gray.astype(np.float32))], CFG)


def test_gray_alpha_array_is_one_image() -> None:
    gray = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    pair = np.stack([gray, np.full_like(gray, 255)], axis=-1)  # (H, W, 2)
    np.testing.assert_allclose(preprocess(pair, CFG), preprocess(gray, CFG), atol=1e-6)
