"""push_to_hub through the real huggingface_hub client against a Hub-compatible server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
import torch

import freetickets_hub
from freetickets_hub import EnsembleModel

from .conftest_hub import INPUT, make_ensemble
from .hub_server import USER, HubServer

PIXELS = torch.randn(4, *INPUT, generator=torch.Generator().manual_seed(0))
# huggingface_hub's own LFS upload trips an httpx deprecation notice; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")
ARTIFACT = {"README.md", "config.json", "handler.py", "model.safetensors", "requirements.txt"}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """The fake Hub, with huggingface_hub pointed at it in this process (it read HF_ENDPOINT at import)."""
    with HubServer() as server:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        yield server


def test_push_to_hub_makes_one_commit_that_loads_back_identically(hub: HubServer, tmp_path: Path) -> None:
    model = make_ensemble(seed=0)
    commit = model.push_to_hub("me/tiny-edst", private=True, commit_message="first upload", token="hf_test")
    assert len(hub.commits) == 1
    pushed = hub.commits[0]
    assert (pushed.repo_id, pushed.revision, pushed.summary, pushed.create_pr) == (
        "me/tiny-edst",
        "main",
        "first upload",
        False,
    )
    assert set(pushed.files) == ARTIFACT
    assert commit.commit_url.startswith(f"{hub.url}/me/tiny-edst/commit/")
    assert hub.state.repos["me/tiny-edst"]["visibility"] == "private"
    assert [path for method, path, _ in hub.state.requests if method == "PUT"] == [
        f"/lfs/{hashlib.sha256(pushed.files['model.safetensors']).hexdigest()}"
    ]  # the weights travel through LFS
    api_agents = {agent for method, _, agent in hub.state.requests if method == "POST"}  # LFS PUTs go to storage
    assert all(f"freetickets-hub/{freetickets_hub.__version__}" in agent for agent in api_agents)
    assert 'EnsembleModel.from_pretrained("me/tiny-edst")' in pushed.files["README.md"].decode()
    loaded = EnsembleModel.from_pretrained(pushed.write_to(tmp_path / "downloaded"))
    assert torch.equal(loaded(PIXELS).probs, model(PIXELS).probs)


def test_push_to_a_new_branch_and_as_a_pull_request(hub: HubServer) -> None:
    model = make_ensemble(seed=1, members=1)
    model.push_to_hub("me/tiny", revision="calibrated", token="hf_test")
    commit = model.push_to_hub("me/tiny", create_pr=True, token="hf_test")
    assert [(c.revision, c.create_pr) for c in hub.commits] == [("calibrated", False), ("main", True)]
    assert "calibrated" in hub.state.branches["me/tiny"]
    assert commit.pr_url == f"{hub.url}/me/tiny/discussions/2"


def test_save_pretrained_can_push_like_the_mixin(hub: HubServer, tmp_path: Path) -> None:
    make_ensemble(seed=3, members=1).save_pretrained(tmp_path / "local", push_to_hub=True, token="hf_test")
    assert [(c.repo_id, set(c.files)) for c in hub.commits] == [(f"{USER}/local", ARTIFACT)]
    assert (tmp_path / "local" / "model.safetensors").is_file()


def test_cli_push_uploads_the_folder_without_pickles_or_checkpoints(tmp_path: Path) -> None:
    model = make_ensemble(seed=2)
    run = tmp_path / "runs" / "x"
    model.save_pretrained(run, values_dtype="float16")
    (run / "onnx").mkdir()
    (run / "onnx" / "model.onnx").write_bytes(b"\x08\x07graph")
    (run / "onnx" / "model.onnx.data").write_bytes(b"\x00" * 64)
    (run / "assets").mkdir()
    (run / "assets" / "reliability.png").write_bytes(b"\x89PNG\x00")
    (run / "eval_results.json").write_text(
        '{"dataset": "zalando-datasets/fashion_mnist", "ensemble": {"accuracy": 0.9}}'
    )
    (run / "optimizer.pt").write_bytes(b"\x80\x04pickle")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step_10.safetensors").write_bytes(b"\x00")
    with HubServer() as hub:
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.url,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(tmp_path / "home"),
        }
        result = subprocess.run(
            [sys.executable, "-m", "freetickets_hub.cli", "push", str(run), "me/x", "--token", "hf_test"],
            capture_output=True,
            text=True,
            env=env,
        )
    assert result.returncode == 0, result.stderr
    assert f"pushed {run} to me/x: {hub.url}/me/x/commit/" in result.stdout
    assert len(hub.commits) == 1
    files = hub.commits[0].files
    assert set(files) == ARTIFACT | {
        "eval_results.json",
        "onnx/model.onnx",
        "onnx/model.onnx.data",
        "assets/reliability.png",
    }
    assert len(files["model.safetensors"]) == (run / "model.safetensors").stat().st_size  # fp16 values stay fp16
    assert "value: 0.9" in files["README.md"].decode()  # the card is rendered from the folder's evaluation
    loaded = EnsembleModel.from_pretrained(hub.commits[0].write_to(tmp_path / "downloaded"))
    assert torch.equal(loaded(PIXELS).probs, EnsembleModel.from_pretrained(run)(PIXELS).probs)
