"""The CLI's promise on bad flags: one line naming the problem, exit 2, nothing changed or loaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from freetickets_hub.cli import main

from .conftest_hub import make_ensemble


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "model"
    make_ensemble(seed=1, members=2).save_pretrained(folder)
    return folder


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("value", ["0", "-1"])
@pytest.mark.parametrize("verb", ["predict", "calibrate", "evaluate"])
def test_a_batch_size_below_one_is_one_line_and_exit_2(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], verb: str, value: str
) -> None:
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
    args = {
        "predict": [str(image)],
        "calibrate": ["--dataset", "nowhere", "--split", "validation"],
        "evaluate": ["--dataset", "nowhere"],
    }[verb]
    assert main([verb, str(saved), *args, "--batch-size", value]) == 2
    assert f"--batch-size must be at least 1, got {value}" in one_line(capsys)


def test_the_python_api_refuses_a_batch_size_below_one(saved: Path) -> None:
    from freetickets_hub import EnsembleModel

    image = np.zeros((28, 28), np.uint8)
    for batch_size in (0, -1):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            EnsembleModel.from_pretrained(saved).predict([image], batch_size=batch_size)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--score", "entropy"], "--score tunes the abstention threshold that --target-risk fits"),
        (["--delta", "0.05"], "--delta tunes the abstention threshold that --target-risk fits"),
        (["--conformal-score", "aps"], "--conformal-score tunes the conformal prediction sets that --conformal-alpha"),
    ],
)
def test_calibrate_refuses_rule_flags_without_the_rule(
    saved: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    before = {p.name: p.read_bytes() for p in saved.iterdir() if p.is_file()}
    assert main(["calibrate", str(saved), "--dataset", "nowhere", "--split", "validation", *flags]) == 2
    assert message in one_line(capsys)
    assert {p.name: p.read_bytes() for p in saved.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_serve_refuses_a_corrupt_graph_before_binding_the_port(
    tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    damage: str,
) -> None:  # fmt: skip
    import shutil

    from freetickets_hub.serving import server

    from .serve_support import exported_model

    folder = tmp_path_factory.mktemp("corrupt") / "model"
    shutil.copytree(exported_model(tmp_path_factory), folder)
    graph = folder / "onnx" / "model.onnx"
    graph.write_bytes(b"\x08\x07not a graph" * 50 if damage == "garbage" else graph.read_bytes()[:500])
    monkeypatch.setattr(server, "run_server", lambda settings: pytest.fail("the server started on a corrupt graph"))
    assert main(["serve", str(folder)]) == 2
    err = one_line(capsys)
    assert "onnx/model.onnx is not a valid ONNX graph" in err and "freetickets export onnx" in err


def test_docs_are_opt_in_because_their_assets_come_from_a_cdn() -> None:
    from starlette.testclient import TestClient

    from freetickets_hub.cli import build_parser
    from freetickets_hub.serving.app import create_app
    from freetickets_hub.serving.service import ServeSettings

    assert build_parser().parse_args(["serve", "m", "--docs"]).docs
    for docs, status in ((False, 404), (True, 200)):
        client = TestClient(create_app(ServeSettings("m", docs=docs)))  # no lifespan: the model is not loaded
        assert client.get("/docs").status_code == status and client.get("/redoc").status_code == status
        assert client.get("/openapi.json").status_code == 200


def test_predict_skips_a_decompression_bomb_and_says_so_in_its_exit_status(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow's DecompressionBombError on one file (here a 20000x20000 image, scaled down) skips only that file."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's bomb error: over twice this, like 20000x20000
    bomb, good = tmp_path / "bomb.png", tmp_path / "good.png"
    Image.new("L", (100, 100)).save(bomb)
    Image.fromarray(np.full((28, 28), 128, np.uint8)).save(good)
    assert main(["predict", str(saved), str(bomb), str(good), "--backend", "torch"]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert err[0].startswith(f"freetickets predict: skipped {bomb}") and "decompression bomb" in err[0].lower()
    assert err[-1] == "freetickets predict: 1 of 2 image(s) skipped" and "Traceback" not in captured.err
    assert str(good) in captured.out and str(bomb) not in captured.out
    assert main(["predict", str(saved), str(good), "--backend", "torch", "--json"]) == 0
