"""Slim members in the Hub artifact (issue 23): ``ensemble.member_widths``, format version 2, strict loading.

A slim member is its timm architecture with fewer channels (``training/channel_sparsity.py``). The
artifact stores its tensors at their physical shapes and its widths record in ``config.json``, so
``from_pretrained`` rebuilds it before loading strictly; an ensemble without slim members keeps
writing format 1, exactly as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from freetickets_hub import EnsembleConfig, EnsembleModel
from freetickets_hub.cli import main
from freetickets_hub.errors import ArtifactError, ConfigError
from freetickets_hub.model.merge import merge_ensembles
from freetickets_hub.model.widths import module_widths

from .serve_support import running
from .test_channels import WRN, _slim_wrn

SHAPE = {"model_args": {"in_chans": 1}, "pretrained_cfg": {"input_size": [1, 16, 16], "mean": [0.5], "std": [0.5]}}


def slim_ensemble(seeds: tuple[int, ...] = (0, 1), method: str = "dst") -> EnsembleModel:
    """Members slimmed by UMM to different channels (sparsity 0.5 and 0.3 of the channels)."""
    slims = [_slim_wrn(seed, sparsity=0.5 if i % 2 == 0 else 0.3) for i, seed in enumerate(seeds)]
    info = {"method": method, "num_members": len(seeds), "sparsity": 0.8, "distribution": "erk"}
    info["member_widths"] = [json.loads(json.dumps(slim.widths)) for _, slim in slims]
    model = EnsembleModel(EnsembleConfig("cifar_wrn10_2", 10, **SHAPE, ensemble=info))
    for index, (member, slim) in enumerate(slims):
        model.load_member(index, member.state_dict(), slim.masks)
    return model.eval()


def test_members_are_built_at_their_recorded_widths() -> None:
    model = slim_ensemble()
    widths = model.config.ensemble.member_widths
    assert [module_widths(m) for m in model.members] == widths and widths[0] != widths[1]
    assert model.config.ensemble.format_version == 2
    assert model.members[0].num_features == 64  # cifar_wrn10_2 has 128


def test_a_slim_ensemble_round_trips_exactly(tmp_path: Path) -> None:
    model = slim_ensemble()
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["ensemble"]
    assert stored["format_version"] == 2 and stored["member_widths"] == model.config.ensemble.member_widths
    loaded = EnsembleModel.from_pretrained(tmp_path)
    x = torch.randn(4, *WRN[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).member_probs, model(x).member_probs, atol=0, rtol=0)
    for mine, theirs in zip(model.masks, loaded.masks, strict=True):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_full_width_ensemble_still_writes_format_1() -> None:
    config = EnsembleConfig("cifar_wrn10_2", 10, **SHAPE, ensemble={"num_members": 2})
    stored = config.to_dict()["ensemble"]
    assert stored["format_version"] == 1 and "member_widths" not in stored  # byte for byte what format 1 wrote
    every_member_full = EnsembleConfig(
        "cifar_wrn10_2", 10, **SHAPE, ensemble={"num_members": 2, "member_widths": [None, None]}
    )
    assert every_member_full.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    ("ensemble", "message"),
    [
        ({"format_version": 3}, "format_version 3 is not supported"),
        ({"num_members": 2, "format_version": 1, "member_widths": [{"fc": [10, 64]}, None]}, "needs format_version 2"),
        ({"num_members": 2, "member_widths": [None]}, "has 1 entries but num_members is 2"),
        ({"num_members": 1, "member_widths": [{"fc": [10, 0]}]}, r"member_widths\[0\]\['fc'\] must be a list"),
        ({"num_members": 1, "member_widths": "narrow"}, "member_widths must be of type list"),
    ],
)
def test_bad_format_versions_and_widths_are_refused_by_name(ensemble: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EnsembleConfig("cifar_wrn10_2", 10, **SHAPE, ensemble=ensemble)


def test_a_width_that_does_not_match_the_tensors_is_refused_by_name(tmp_path: Path) -> None:
    slim_ensemble().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["ensemble"]["member_widths"][1]["stages.1.0.conv1"][0] += 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"members\.1\.stages\.1\.0\.conv1\.weight"):
        EnsembleModel.from_pretrained(tmp_path)


def test_merging_slim_dst_runs_keeps_each_members_channels() -> None:
    a, b = slim_ensemble((0, 1)), slim_ensemble((2, 3))
    merged = merge_ensembles([a, b])
    assert merged.config.ensemble.member_widths == [*a.config.ensemble.member_widths, *b.config.ensemble.member_widths]
    x = torch.randn(2, *WRN[1])
    with torch.no_grad():
        expected = torch.cat([a(x).member_probs, b(x).member_probs])
        torch.testing.assert_close(merged(x).member_probs, expected, atol=0, rtol=0)


def test_a_slim_member_is_not_exported_as_a_plain_timm_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="member 0 is slim"):
        slim_ensemble().export_member(0, tmp_path)


def test_a_slim_ensemble_exports_and_serves_with_the_torch_outputs(tmp_path: Path) -> None:
    model = slim_ensemble()
    model.save_pretrained(tmp_path / "slim")
    assert main(["export", "onnx", str(tmp_path / "slim")]) == 0  # the export's own parity gate: 1e-5
    x = np.random.default_rng(4).normal(size=(3, *WRN[1])).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).probs.numpy()
    with running(tmp_path / "slim", "--name", "slim", log=tmp_path / "server.log") as server:
        body = {
            "inputs": [{"name": "pixel_values", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
        }
        reply = httpx.post(f"{server.url}/v2/models/slim/infer", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    probs = next(o for o in reply.json()["outputs"] if o["name"] == "probs")
    np.testing.assert_allclose(np.array(probs["data"]).reshape(expected.shape), expected, atol=1e-5, rtol=0)


def test_fine_tuning_a_slim_base_keeps_its_channels_and_masks(tmp_path: Path) -> None:
    from .test_finetune import FAST, write_class_subset

    base = slim_ensemble()
    base.save_pretrained(tmp_path / "base")
    data = write_class_subset([5, 6, 7, 8, 9], tmp_path / "fmnist_5_9", {"train": 64, "test": 32})
    args = ["finetune", str(tmp_path / "base"), "--dataset", str(data), "--output-dir", str(tmp_path / "ft")]
    args += ["--recipe", "training/recipes/finetune_small.yaml", "--set", "val_size=0"]
    assert main([*args, *(a for s in FAST for a in ("--set", s))]) == 0
    tuned = EnsembleModel.from_pretrained(tmp_path / "ft")  # strict: every tensor at the recorded widths
    for index, (before, after) in enumerate(
        zip(base.config.ensemble.member_widths, tuned.config.ensemble.member_widths, strict=True)
    ):
        assert after == {**before, "fc": [5, before["fc"][1]]}, index  # a new 5-class head at the slim width
        kept = {name: mask for name, mask in base.masks[index].items() if not name.startswith("fc.")}
        assert all(torch.equal(tuned.masks[index][name], mask) for name, mask in kept.items())  # frozen-masks


def test_calibrate_and_evaluate_run_on_a_slim_ensemble(tmp_path: Path) -> None:
    from .test_evaluation import model_labels, random_images, write_dataset

    model = slim_ensemble()
    model.save_pretrained(tmp_path / "slim")
    images = random_images(80, size=16)
    labels = model_labels(model, images, flip=0.3)  # the model's own answers, 30 % of them wrong
    names = [f"class_{i}" for i in range(10)]
    data = write_dataset(
        tmp_path / "data", {"train": (images[:40], labels[:40]), "test": (images[40:], labels[40:])}, names
    )
    assert main(["calibrate", str(tmp_path / "slim"), "--dataset", str(data), "--split", "train"]) == 0
    calibrated = EnsembleModel.from_pretrained(tmp_path / "slim")
    assert calibrated.config.ensemble.calibration is not None and calibrated.config.ensemble.member_widths
    assert main(["evaluate", str(tmp_path / "slim"), "--dataset", str(data)]) == 0
    results = json.loads((tmp_path / "slim" / "eval_results.json").read_text())
    assert results["diversity"]["mask_distance"]["layers"]  # the layers whose shapes agree are compared
