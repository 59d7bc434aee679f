"""Fine-tuning an EDST ensemble trained on Fashion-MNIST classes 0-4 on classes 5-9 (real data, tiny sizes)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from datasets import load_dataset
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from freetickets_hub import EnsembleModel
from freetickets_hub.cli import main
from freetickets_hub.data import run_validation_rows
from freetickets_hub.errors import RecipeError
from freetickets_hub.training import lr_search
from freetickets_hub.training.data import augment_batch
from freetickets_hub.training.finetune import FineTuneRecipe, finetune, load_finetune_recipe, param_groups, search_lr
from freetickets_hub.training.phases import plan_runs
from freetickets_hub.training.sparsity import SparseEngine, SparsityConfig, maskable_weights

from .conftest import SHARED_FMNIST
from .conftest_hub import make_ensemble, put_in_hub_cache

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "c" * 40
HEAD = "fc.weight"
# a few optimizer steps per member: 128 images, batches of 32, one epoch
FAST = ["epochs=1", "warmup_epochs=0", "batch_size=32", "eval_batch_size=128", "max_train_samples=128"]


def write_class_subset(classes: list[int], dest: Path, counts: dict[str, int]) -> Path:
    """Fashion-MNIST images of ``classes`` (relabelled 0..n-1) as parquet: the fine-tuning benchmark's writer."""
    spec = importlib.util.spec_from_file_location("finetune_data", ROOT / "benchmarks" / "finetune_data.py")
    finetune_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune_data)
    return finetune_data.write_class_subset(str(SHARED_FMNIST), classes, dest, counts)


@pytest.fixture(scope="session")
def fmnist_5_9(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_class_subset([5, 6, 7, 8, 9], tmp_path_factory.mktemp("fmnist_5_9"), {"train": 160, "test": 64})


@pytest.fixture(scope="session")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-member EDST ensemble (S=0.8, ERK) trained for a few steps on Fashion-MNIST classes 0-4."""
    root = tmp_path_factory.mktemp("base")
    data = write_class_subset([0, 1, 2, 3, 4], root / "fmnist_0_4", {"train": 160, "test": 64})
    sets = ["max_train_samples=128", "val_size=0", "batch_size=32", "eval_batch_size=128", "update_interval=2"]
    sets += ["explore_epochs=1", "refine_epochs=1", "num_members=2", f"dataset={data}"]
    args = ["train", "--recipe", "training/recipes/fmnist_tiny_edst.yaml", "--output-dir", str(root / "edst")]
    assert main([*args, *(a for s in sets for a in ("--set", s))]) == 0
    return root / "edst"


def _finetune(base: Path | str, dataset: Path, out: Path, *extra: str, sets: tuple[str, ...] = ()) -> int:
    args = ["finetune", str(base), "--dataset", str(dataset), "--output-dir", str(out)]
    args += ["--recipe", "training/recipes/finetune_small.yaml", "--set", "val_size=0"]
    return main([*args, *(a for s in (*FAST, *sets) for a in ("--set", s)), *extra])


@pytest.fixture(scope="module")
def frozen(base: Path, fmnist_5_9: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("frozen") / "ft"
    assert _finetune(base, fmnist_5_9, out) == 0
    return out


def _counts(masks: dict[str, torch.Tensor]) -> dict[str, int]:
    return {name: int(mask.sum()) for name, mask in masks.items()}


def test_frozen_masks_keep_every_mask_and_count_and_give_new_sparse_heads(base: Path, frozen: Path) -> None:
    before, after = EnsembleModel.from_pretrained(base), EnsembleModel.from_pretrained(frozen)
    assert after.config.label_names == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert after.config.num_classes == 5 and after.num_members == before.num_members == 2
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct"):  # the base's preprocessing
        assert after.config.pretrained_cfg[key] == before.config.pretrained_cfg[key], key
    assert after.config.ensemble.method == "edst" and after.config.ensemble.calibration is None
    heads = []
    for i, (old, new) in enumerate(zip(before.masks, after.masks, strict=True)):
        assert new.keys() == old.keys()
        for name in old.keys() - {HEAD}:
            assert torch.equal(old[name], new[name]), f"member {i}: mask of {name} changed"
        weights = after.members[i].state_dict()
        for name, mask in new.items():  # nonzero weights: exactly the mask's positions
            assert int(torch.count_nonzero(weights[name])) == int(mask.sum()), name
        old_weights = before.members[i].state_dict()
        assert not torch.equal(weights["conv_stem.weight"], old_weights["conv_stem.weight"])  # weights trained
        assert weights[HEAD].shape == (5, 128)
        if HEAD in old:  # the new head keeps the density ERK gave the old one
            assert abs(new[HEAD].float().mean() - old[HEAD].float().mean()) < 1 / 640
        heads.append(weights[HEAD])
    assert _counts({k: v for k, v in after.masks[0].items() if k != HEAD}) == _counts(
        {k: v for k, v in before.masks[0].items() if k != HEAD}
    )
    assert not torch.equal(heads[0], heads[1])  # each member's head has its own seed


def test_summary_records_lineage_and_diversity_before_and_after(base: Path, frozen: Path) -> None:
    summary = json.loads((frozen / "train_summary.json").read_text())
    assert summary["base_model"] == base.name and summary["base_model_relation"] == "finetune"  # no machine path
    assert summary["base_model_is_repo_id"] is False
    assert summary["base_model_sha256"] == hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    assert summary["base_model_revision"] is None  # a folder has no Hub commit
    assert summary["recipe"]["method"] == "static_sparse"  # the trainer's own recipe: no mask updates
    assert summary["finetune"]["mode"] == "frozen-masks" and summary["finetune"]["new_heads"]
    diversity = summary["finetune"]["diversity"]
    assert diversity["before"]["label_space"] == "base" and diversity["before"]["accuracy"] is None
    assert diversity["after"]["accuracy"] == pytest.approx(summary["test"]["ensemble"]["accuracy"])
    for when in ("before", "after"):
        block = diversity[when]
        assert 0 <= block["disagreement"] <= 1 and block["pairwise_kl"] >= 0 and block["mutual_information"] >= 0
        assert block["feature_cka"] <= 1 + 1e-9
        assert block["mask_jaccard_distance"] > 0  # EDST members keep different masks
    assert diversity["after"]["mask_jaccard_distance"] == pytest.approx(diversity["before"]["mask_jaccard_distance"])
    assert diversity["after"]["pairwise_kl"] > 0  # the members still differ
    assert set(summary["test"]) == {"member_0", "member_1", "ensemble"}
    assert summary["costs"]["training_flops"] > 0 and summary["wall_time_s"] > 0
    card = (frozen / "README.md").read_text()
    assert (
        f"Fine-tuned from `{base.name}`." in card
        and str(base) not in card
        and "## Fine-tuning" in card
        and "frozen-masks" in card
    )
    shipped = load_finetune_recipe(SMALL_RECIPE)
    lrs = f"LR {shipped.lr:g} for the new heads and {shipped.backbone_lr:g} for the backbone"
    assert "augmentation `crop`" in card and lrs in card
    assert "base_model" not in ModelCard(card).data.to_dict()  # a local folder is no Hub id


def test_refuses_a_folder_holding_a_model(base: Path, fmnist_5_9: Path, frozen: Path, capsys) -> None:
    assert _finetune(base, fmnist_5_9, frozen) == 2
    assert "already holds a model" in capsys.readouterr().err
    assert _finetune(base, fmnist_5_9, base, "--overwrite") == 2
    assert "the base model's own folder" in capsys.readouterr().err


def test_fine_tuned_folder_exports_to_onnx_with_parity(frozen: Path, tmp_path: Path) -> None:
    from freetickets_hub.export.onnx import export_onnx

    shutil.copytree(frozen, tmp_path / "ft", ignore=shutil.ignore_patterns("checkpoints"))
    report = export_onnx(tmp_path / "ft", batch_sizes=(1, 3))
    assert (tmp_path / "ft" / "onnx" / "model.onnx").is_file() and report.num_members == 2
    assert max(report.max_abs_diff[k] for k in report.gated_outputs) <= report.tolerance  # export_onnx checks too


@pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")  # huggingface_hub's LFS upload
def test_fine_tuned_folder_pushes_in_one_commit_without_checkpoints(
    frozen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .hub_server import HubServer

    with HubServer() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        assert main(["push", str(frozen), "me/tiny-edst-ft", "--token", "hf_test"]) == 0
    assert len(hub.commits) == 1
    files = set(hub.commits[0].files)
    assert {"config.json", "model.safetensors", "README.md", "train_summary.json"} <= files
    assert not any(name.startswith("checkpoints") for name in files)  # local resume state never travels
    pushed = EnsembleModel.from_pretrained(hub.commits[0].write_to(tmp_path / "downloaded"))
    assert pushed.config.label_names == EnsembleModel.from_pretrained(frozen).config.label_names


def test_dst_mode_moves_masks_at_exactly_the_layer_densities(base: Path, fmnist_5_9: Path, tmp_path: Path) -> None:
    sets = ("update_interval=1", "prune_rate=0.5", "growth=random")
    assert _finetune(base, fmnist_5_9, tmp_path / "dst", "--mode", "dst", sets=sets) == 0
    before, after = EnsembleModel.from_pretrained(base), EnsembleModel.from_pretrained(tmp_path / "dst")
    for old, new in zip(before.masks, after.masks, strict=True):
        assert new.keys() == old.keys()
        assert {k: v for k, v in _counts(new).items() if k != HEAD} == {
            k: v for k, v in _counts(old).items() if k != HEAD
        }
        assert any(not torch.equal(old[n], new[n]) for n in old.keys() - {HEAD})  # prune/regrow happened
    summary = json.loads((tmp_path / "dst" / "train_summary.json").read_text())
    assert summary["recipe"]["method"] == "dst" and summary["recipe"]["prune_rate"] == 0.5
    assert summary["finetune"]["diversity"]["after"]["mask_jaccard_distance"] > 0


def test_linear_probe_trains_only_the_heads(base: Path, fmnist_5_9: Path, tmp_path: Path) -> None:
    assert _finetune(base, fmnist_5_9, tmp_path / "lp", "--mode", "linear-probe") == 0
    before, after = EnsembleModel.from_pretrained(base), EnsembleModel.from_pretrained(tmp_path / "lp")
    for old, new in zip(before.members, after.members, strict=True):
        old_state, new_state = old.state_dict(), new.state_dict()
        for name in old_state:
            if not name.startswith("fc."):  # batch-norm statistics included
                assert torch.equal(old_state[name], new_state[name]), f"{name} changed in a linear probe"
        assert new_state["fc.weight"].shape == (5, 128)
    costs = json.loads((tmp_path / "lp" / "train_summary.json").read_text())["costs"]
    assert costs["training_flops"] < costs["training_flops_dense_same_steps"] / 3  # a forward pass, not 3


def test_base_from_hub_id_in_offline_cache_with_smaller_images(
    base: Path, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 12x12 three-class images are resized to the base's 28x28 input, as predict() will resize them."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    put_in_hub_cache(base, tmp_path / "cache", "freetickets/tiny-edst", COMMIT)
    out = tmp_path / "ft"
    assert _finetune("freetickets/tiny-edst", tiny_dataset, out, "--mode", "linear-probe", sets=("augment=crop",)) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["base_model"] == "freetickets/tiny-edst" and summary["base_model_revision"] == COMMIT
    assert summary["base_model_is_repo_id"] is True
    card = ModelCard((out / "README.md").read_text())
    assert card.data.base_model == "freetickets/tiny-edst" and card.data.base_model_relation == "finetune"
    model = EnsembleModel.from_pretrained(out)
    assert model.config.label_names == ["circle", "square", "cross"]
    assert model.config.pretrained_cfg["input_size"] == [1, 28, 28]
    data = load_dataset(str(tiny_dataset), split="test")
    predictions = model.predict([row["image"] for row in data.select(range(6))])
    assert len(predictions) == 6


def test_interrupted_fine_tune_resumes_bit_identically(base: Path, fmnist_5_9: Path, tmp_path: Path) -> None:
    sets = ("update_interval=2", "checkpoint_every=2")
    assert _finetune(base, fmnist_5_9, tmp_path / "full", "--mode", "dst", sets=sets) == 0
    # 4 steps per member: stop inside the second member's run, between two mask updates
    assert _finetune(base, fmnist_5_9, tmp_path / "cut", "--mode", "dst", "--max-steps", "5", sets=sets) == 0
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    assert _finetune(base, fmnist_5_9, tmp_path / "cut", "--mode", "dst", "--resume", sets=("lr=0.02",)) == 2
    assert _finetune(base, fmnist_5_9, tmp_path / "cut", "--mode", "dst", "--resume", sets=sets) == 0
    full, cut = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("full", "cut"))
    assert full.keys() == cut.keys()
    for key in full:  # (the header's metadata order may differ between two writes)
        assert torch.equal(full[key], cut[key]), f"{key} differs after resume"


def test_recipe_is_validated_strictly(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"unknown recipe key 'backbone_lrr' \(did you mean 'backbone_lr'\?\)"):
        load_finetune_recipe(None, ["backbone_lrr=0.1"])
    with pytest.raises(RecipeError, match=r"'backbone_lr' must be in \[0, lr=0.01\]"):
        FineTuneRecipe(lr=0.01, backbone_lr=0.1)
    with pytest.raises(RecipeError, match="'mode' must be one of"):
        FineTuneRecipe(mode="full")
    with pytest.raises(RecipeError, match="'augment' must be one of"):  # a key shared with training recipes
        FineTuneRecipe(augment="mixup")
    with pytest.raises(RecipeError, match="'input_size' must be"):
        FineTuneRecipe(input_size=[28, 28])
    with pytest.raises(RecipeError, match="one value per channel"):
        FineTuneRecipe(input_size=[3, 32, 32], mean=[0.5])
    with pytest.raises(RecipeError, match="'warmup_epochs' must be of type int"):
        load_finetune_recipe("training/recipes/finetune_small.yaml", ["warmup_epochs=0.5"])
    recipe = load_finetune_recipe("training/recipes/finetune_small.yaml", ["epochs=3"], mode="dst", dataset="x")
    assert (recipe.epochs, recipe.mode, recipe.dataset, recipe.base_model) == (3, "dst", "x", None)
    with pytest.raises(RecipeError, match="no base model"):
        finetune(recipe, tmp_path / "out")
    make_ensemble(sparsity=0.0, method="dense_ensemble").save_pretrained(tmp_path / "dense")
    with pytest.raises(RecipeError, match="mode 'dst' needs a sparse base model"):
        finetune(FineTuneRecipe(base_model=str(tmp_path / "dense"), dataset="x", mode="dst"), tmp_path / "out")


@pytest.mark.parametrize("path", sorted((ROOT / "training" / "recipes").glob("finetune_*.yaml")), ids=lambda p: p.name)
def test_bundled_finetune_recipes_load_and_plan_one_run_per_member(path: Path) -> None:
    recipe = load_finetune_recipe(path, dataset="x")
    base = make_ensemble(members=3).config
    training = recipe.training_recipe(base, sparse=True)
    assert training.num_members == 3 and training.sparsity == base.ensemble.sparsity
    assert training.method == ("dst" if recipe.mode == "dst" else "static_sparse")
    assert [run.seed for run in plan_runs(training)] == [recipe.seed + i for i in range(3)]
    assert recipe.backbone_lr < recipe.lr and recipe.warmup_epochs >= 1


SMALL_RECIPE = ROOT / "training" / "recipes" / "finetune_small.yaml"


@pytest.mark.parametrize("path", [None, SMALL_RECIPE], ids=["defaults", "small"])
def test_default_fine_tune_never_mirrors_images(path: Path | None) -> None:
    """The new task is unknown (a mirrored digit is another class): the default augmentation keeps left left."""
    training = load_finetune_recipe(path, dataset="x").training_recipe(make_ensemble().config, sparse=True)
    images = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    images[..., :14] = 255  # bright left half
    out = augment_batch(images, training.augment, training.pad, torch.Generator().manual_seed(0)).float()
    assert (out[..., :10].mean(dim=(1, 2, 3)) > out[..., -10:].mean(dim=(1, 2, 3))).all()


def test_engine_starts_from_given_masks() -> None:
    model = make_ensemble(seed=1).members[0]
    masks = make_ensemble(seed=2).masks[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = SparseEngine(model, optimizer, SparsityConfig(update_interval=1, growth="random"), seed=3, masks=masks)
    weights = maskable_weights(model)
    assert engine.counts == {n: int(masks[n].sum()) if n in masks else w.numel() for n, w in weights.items()}
    engine.step(1)  # a prune/regrow update keeps every layer's count
    assert {n: int(m.sum()) for n, m in engine.masks.items()} == {n: int(m.sum()) for n, m in masks.items()}
    with pytest.raises(ValueError, match="name no maskable weight"):
        SparseEngine(model, optimizer, SparsityConfig(), seed=0, masks={"fc.weight": torch.ones(3, 3, dtype=bool)})


@pytest.mark.slow
def test_fine_tuning_beats_chance_and_training_from_scratch(tmp_path: Path) -> None:
    """A better-trained base (1,000 images of classes 0-4) helps on 300 images of classes 5-9."""
    base_data = write_class_subset([0, 1, 2, 3, 4], tmp_path / "fm04", {"train": 1000, "test": 100})
    target = write_class_subset([5, 6, 7, 8, 9], tmp_path / "fm59", {"train": 300, "test": 500})
    sets = [f"dataset={base_data}", "max_train_samples=1000", "val_size=0", "batch_size=64", "update_interval=8"]
    sets += ["explore_epochs=3", "refine_epochs=1", "num_members=3"]
    args = ["train", "--recipe", "training/recipes/fmnist_tiny_edst.yaml", "--output-dir", str(tmp_path / "base")]
    assert main([*args, *(a for s in sets for a in ("--set", s))]) == 0
    common = ["--recipe", "training/recipes/finetune_small.yaml", "--set", "epochs=3", "--set", "batch_size=32"]
    common += ["--set", "val_size=0", "--dataset", str(target)]
    assert main(["finetune", str(tmp_path / "base"), "--output-dir", str(tmp_path / "ft"), *common]) == 0
    scratch = ["finetune", str(tmp_path / "base"), "--output-dir", str(tmp_path / "scratch"), "--from-scratch"]
    assert main([*scratch, *common]) == 0
    ft, sc = (json.loads((tmp_path / d / "train_summary.json").read_text()) for d in ("ft", "scratch"))
    assert ft["total_steps"] == sc["total_steps"]
    accuracy = ft["test"]["ensemble"]["accuracy"]
    assert accuracy > 0.6  # chance is 0.2
    assert accuracy > sc["test"]["ensemble"]["accuracy"] + 0.05
    after = ft["finetune"]["diversity"]["after"]
    assert after["pairwise_disagreement"] > 0 and after["feature_cka"] < 0.999  # the members still differ


@pytest.mark.slow
def test_two_processes_fine_tune_with_identical_masks(base: Path, fmnist_5_9: Path, tmp_path: Path) -> None:
    # this interpreter's accelerate: a venv's `accelerate` script may run another environment's python
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "freetickets_hub.cli", "finetune", str(base)]
    cmd += ["--dataset", str(fmnist_5_9), "--output-dir", str(tmp_path / "out"), "--mode", "dst"]
    cmd += ["--recipe", "training/recipes/finetune_small.yaml"]
    for item in (*FAST, "val_size=0", "batch_size=16", "update_interval=2"):
        cmd += ["--set", item]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    dist = json.loads((tmp_path / "out" / "train_summary.json").read_text())["distributed"]
    assert dist["num_processes"] == 2 and dist["batches_per_epoch_per_process"] == 128 // (2 * 16)
    assert len(set(dist["mask_hashes_by_process"])) == 1


def test_search_lr_picks_the_good_lr_deterministically_from_the_validation_carve(
    base: Path, fmnist_5_9: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """One sensible head LR between one too small to learn in the time and one that diverges; the carve's
    labels decide, the test split's never do, and the run's first line and its card name the pick."""
    monkeypatch.setattr(lr_search, "LR_FACTORS", (1e-3, 1.0, 100.0))
    monkeypatch.setattr(lr_search, "BACKBONE_RATIOS", (0.2,))
    sizes = {"epochs": 5, "batch_size": 16, "eval_batch_size": 64, "val_size": 32, "max_train_samples": 96}
    recipe = FineTuneRecipe(base_model=str(base), dataset=str(fmnist_5_9), lr=0.05, backbone_lr=0.01, **sizes)
    summary = finetune(recipe, tmp_path / "ft", search_lr=True)
    table = summary["finetune"]["lr_search"]
    assert [row["lr"] for row in table] == pytest.approx([5e-5, 0.05, 5.0])
    chosen = summary["finetune"]["recipe"]
    assert (chosen["lr"], chosen["backbone_lr"]) == pytest.approx((0.05, 0.01))
    assert not (tmp_path / "ft" / "checkpoints" / "lr_search").exists()  # the short runs are removed
    assert (
        "mode: augment crop, 5 epochs per member (1 warm-up), lr 0.05 (heads), backbone_lr 0.01\n"
        in capsys.readouterr().out
    )
    card = (tmp_path / "ft" / "README.md").read_text()
    assert "at LR 0.05 for the new heads and 0.01 for the backbone (chosen by `--search-lr`" in card
    assert "of 3 short runs on the validation carve" in card
    # the same train split, another test split: the same scores, bitwise (seeded; the test split is never read)
    other = tmp_path / "other"
    shutil.copytree(fmnist_5_9, other)
    test = load_dataset(str(fmnist_5_9), split="test").map(lambda y: {"label": (y + 1) % 5}, input_columns="label")
    test.to_parquet(str(other / "data" / "test-00000-of-00001.parquet"))  # every test label now wrong
    picked, again = search_lr(dataclasses.replace(recipe, dataset=str(other)), tmp_path / "search")
    assert again == table and (picked.lr, picked.backbone_lr) == pytest.approx((0.05, 0.01))
    # the carve's labels rotated, the rows it trains on untouched: the model that learned is now confidently
    # wrong on the carve, and the one that barely moved from uniform scores best there
    carve = set(run_validation_rows(summary["recipe"]))
    train = load_dataset(str(fmnist_5_9), split="train")
    rotated = train.map(
        lambda y, i: {"label": (y + 1) % 5 if i in carve else y}, input_columns="label", with_indices=True
    )
    rotated.to_parquet(str(other / "data" / "train-00000-of-00001.parquet"))
    picked, moved = search_lr(dataclasses.replace(recipe, dataset=str(other)), tmp_path / "search2")
    assert picked.lr == pytest.approx(5e-5) and moved[1]["val_nll"] > table[1]["val_nll"]


def test_a_failed_fine_tune_can_be_run_again(
    base: Path, fmnist_5_9: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A run that fails before its first checkpoint leaves nothing that refuses its own rerun; the rerun
    logs the base model's own method (EDST), not the loop's static_sparse."""
    finetune_module = importlib.import_module(
        "freetickets_hub.training.finetune"
    )  # the package re-exports the function

    def crash(*args: object, **kwargs: object) -> dict:
        raise RuntimeError("out of memory")

    out = tmp_path / "ft"
    monkeypatch.setattr(finetune_module, "train", crash)
    with pytest.raises(RuntimeError, match="out of memory"):
        _finetune(base, fmnist_5_9, out)
    assert not (out / "checkpoints").exists()
    monkeypatch.undo()
    assert _finetune(base, fmnist_5_9, out, "--max-steps", "1") == 0
    printed = capsys.readouterr().out
    assert "edst: " in printed and "static_sparse" not in printed and "(edst, M=2)" in printed
    assert (out / "checkpoints" / "finetune_base.json").is_file()  # stopped with a checkpoint: resumable
    assert _finetune(base, fmnist_5_9, out) == 2  # and then a rerun without --resume is refused
    assert "already holds a model" in capsys.readouterr().err


def test_a_missing_dataset_or_checkpoint_changes_nothing(base: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ft"
    assert _finetune(base, tmp_path / "no_such_dataset", out) == 2
    assert "cannot load dataset" in capsys.readouterr().err and not out.exists()
    for folder in (out, tmp_path):  # absent, and empty
        assert main(["finetune", str(base), "--output-dir", str(folder), "--resume", "--dataset", str(base)]) == 2
        err = capsys.readouterr().err
        assert "--resume: no checkpoint in" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["frozen-masks", "linear-probe"])
@pytest.mark.parametrize("filter_bias_and_bn", [False, True])
def test_param_groups_scale_the_backbone_and_spare_biases_and_norms_from_decay(
    mode: str, filter_bias_and_bn: bool
) -> None:
    member = make_ensemble().members[0]
    recipe = FineTuneRecipe(mode=mode, lr=0.01, backbone_lr=0.002, filter_bias_and_bn=filter_bias_and_bn)
    groups = param_groups(member, recipe)
    head = {id(p) for p in member.get_classifier().parameters()}
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in member.parameters())  # every weight once (the engine needs all)
    backbone_scale = 0.0 if mode == "linear-probe" else pytest.approx(0.2)
    for group in groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1  # a group is one part
        assert group["lr_scale"] == (1.0 if in_head == {True} else backbone_scale)
        small = [p.ndim <= 1 for p in group["params"]]
        if filter_bias_and_bn:  # timm's rule: biases and norm parameters never decay, the rest at the recipe's
            assert group["weight_decay"] == (0.0 if all(small) else recipe.weight_decay) and len(set(small)) == 1
        else:
            assert "weight_decay" not in group  # the optimizer's: the recipe's weight_decay
    names = {id(p): n for n, p in member.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g.get("weight_decay") == 0.0 for p in g["params"]}
    assert filter_bias_and_bn == any(n.endswith(".bias") for n in no_decay) == any("bn" in n for n in no_decay)
    frozen = {id(p) for p in member.parameters() if not p.requires_grad}
    assert frozen == ({id(p) for p in member.parameters()} - head if mode == "linear-probe" else set())
