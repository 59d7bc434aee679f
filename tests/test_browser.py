"""The page at ``/`` in a real headless Chromium (Debian's, driven by Playwright): upload a Fashion-MNIST image.

CI installs ``/usr/bin/chromium`` (``.ci/run``, ``make test``); the flags keep it off the network.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from freetickets_hub.engines.onnxruntime import OnnxEnsemble

from .conftest import SHARED_FMNIST
from .serve_support import exported_model, running

CHROMIUM = Path(os.environ.get("FREETICKETS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def fmnist_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Fashion-MNIST test image as a PNG file, as a user would pick it."""
    import datasets

    image: Image.Image = datasets.load_dataset(str(SHARED_FMNIST), split="test")[7]["image"]
    path = tmp_path_factory.mktemp("upload") / "fmnist_test_7.png"
    image.save(path)
    return path


def _abstaining_copy(model_dir: Path, folder: Path) -> Path:
    """The same ensemble with a selective rule no image passes (entropy <= 0): it always abstains."""
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["ensemble"]["selective"] = {
        "n": 100, "fit_on": "a test rule", "score": "entropy", "threshold": 0.0, "target_risk": 0.05,
        "delta": 0.1, "calibration_coverage": 0.0, "calibration_risk": 0.0,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_upload_renders_label_uncertainty_and_votes(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, fmnist_image: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM.is_file(), f"{CHROMIUM} is missing: `apt-get install -y chromium` (make test does it in CI)"
    model_dir = exported_model(tmp_path_factory)
    expected = OnnxEnsemble.from_pretrained(model_dir).predict([str(fmnist_image)]).to_records(top_k=5)[0]
    with running(model_dir, log=tmp_path / "server.log") as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            page = browser.new_page()
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            response = page.goto(server.url + "/", timeout=30_000)
            assert response is not None and response.status == 200
            assert "default-src 'none'" in response.headers["content-security-policy"]
            # locator waits run outside the page's world, so its CSP (no eval) does not get in the way
            expect(page.locator("#model")).to_contain_text("3 members", timeout=30_000)
            expect(page.locator("#model")).to_contain_text("onnx fp32 on CPUExecutionProvider")
            page.set_input_files("#file", str(fmnist_image))
            expect(page.locator("#result")).to_be_visible(timeout=30_000)
            assert page.text_content("#label") == expected["label"]
            assert page.text_content("#confidence") == f"confidence {expected['confidence']:.4f}"
            bars = page.locator("#topk .bar").all_inner_texts()
            assert [bar.split("\n")[0] for bar in bars] == [t["label"] for t in expected["top_k"]]
            assert f"{expected['mutual_information']:.4f}" in page.text_content("#uncertainty")
            assert page.locator("#members tr").count() == 3
            assert page.text_content("#badge") == ""  # no selective calibration: no abstain badge
            screenshot = tmp_path / "page.png"
            page.screenshot(path=str(screenshot), full_page=True)
            with Image.open(screenshot) as shot:
                assert shot.width > 300 and shot.height > 300
                assert len(np.unique(np.asarray(shot.convert("L")))) > 10  # something was drawn
            foreign = [url for url in requested if not url.startswith(server.url) and not url.startswith("blob:")]
            assert not foreign, f"the page fetched from elsewhere: {foreign}"
        finally:
            browser.close()


def test_an_abstention_reads_as_no_answer_with_the_best_guess(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, fmnist_image: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    model_dir = _abstaining_copy(exported_model(tmp_path_factory), tmp_path / "abstaining")
    expected = OnnxEnsemble.from_pretrained(model_dir).predict([str(fmnist_image)]).to_records(top_k=5)[0]
    assert expected["abstain"] is True
    with running(model_dir, log=tmp_path / "server.log") as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            page = browser.new_page()
            page.goto(server.url + "/", timeout=30_000)
            expect(page.locator("#model")).to_contain_text("3 members", timeout=30_000)
            page.set_input_files("#file", str(fmnist_image))
            expect(page.locator("#result")).to_be_visible(timeout=30_000)
            assert page.text_content("#label") == "No answer"
            assert page.text_content("#badge") == "the model abstains"
            best_guess = f"best guess {expected['label']}, confidence {expected['confidence']:.4f}"
            assert page.text_content("#confidence") == best_guess
        finally:
            browser.close()
