"""Fine-tune a released ensemble on a new task, on the training loop of ``train.py``.

Every member starts from its own weights and masks. When the label set differs, each member gets a
new classifier drawn with its own seed, sparse at the density the base model's distribution gave
that layer, so the ensemble keeps its sparsity. The base model's preprocessing (``pretrained_cfg``)
is kept unless the recipe overrides it, as timm does. Three modes:

- ``frozen-masks`` (default): masks bitwise unchanged, the weights under them train;
- ``dst``: prune and regrow continue at the recipe's p and ΔT (each layer keeps its nonzero count);
- ``linear-probe``: only the heads train; the backbone, batch-norm statistics included, is frozen.

The backbone trains at ``backbone_lr``, below the heads' ``lr``, after a linear warm-up. The summary
records the base model's id, revision and weights hash, and the members' diversity on the new test
split before (the base members, their own heads) and after fine-tuning.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from freetickets_hub.artifact.config import EnsembleConfig, EnsembleInfo
from freetickets_hub.artifact.files import write_text_atomic
from freetickets_hub.artifact.names import WEIGHTS_NAME
from freetickets_hub.data import fit_images, is_input_sized
from freetickets_hub.errors import FreeTicketsError, RecipeError
from freetickets_hub.evaluation.diversity import mask_distance, prediction_diversity
from freetickets_hub.model.ensemble import EnsembleModel
from freetickets_hub.uncertainty.outputs import combine_member_logits

from . import lr_search
from .checkpoint import CHECKPOINTS, latest_checkpoint, prepare_run_dir
from .costs import layer_flops
from .data import ImageData, ImageSplit, Split, StreamedSplit, load_image_data, timm_train_transform
from .finetune_recipe import MODES, FineTuneRecipe, load_finetune_recipe, resolve_pretrained_cfg
from .sparsity import draw_masks, nonzero_counts
from .summary import split_metrics
from .train import train, weight_decay_groups

__all__ = [
    "MODES",
    "FineTuneRecipe",
    "finetune",
    "format_diversity",
    "load_finetune_recipe",
    "param_groups",
    "search_lr",
]

LINEAGE_NAME = "finetune_base.json"  # in checkpoints/: what a resumed run must fine-tune again


def finetune(
    recipe: FineTuneRecipe,
    output_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    max_steps: int | None = None,
    report_to: str | None = None,
    from_scratch: bool = False,
    search_lr: bool = False,
) -> dict[str, Any]:
    """Fine-tune ``recipe.base_model`` on ``recipe.dataset`` and write the new ensemble to ``output_dir``.

    Args:
        recipe: what to fine-tune, on what, how.
        output_dir: the Hub-ready folder to write (checkpoints in ``output_dir/checkpoints``).
        resume: continue from the latest checkpoint (same base model and recipe only).
        overwrite: replace a model already in ``output_dir``, with its checkpoints and companions.
        max_steps: stop after this many optimizer steps, with a checkpoint (continue with ``resume``).
        report_to: an accelerate tracker name, e.g. "tensorboard".
        from_scratch: the baseline instead: the same recipe, data and steps from a random init with
            random masks at the base model's sparsity (every layer at the recipe's ``lr``).
        search_lr: first pick ``lr`` and ``backbone_lr`` by validation NLL from a few short runs
            (:mod:`.lr_search`); needs ``val_size`` > 0.

    Returns:
        The summary written to ``train_summary.json`` (empty on other processes or when stopped early).

    Raises:
        RecipeError: no base model or dataset, or a recipe that does not fit the base model.
        FreeTicketsError: ``output_dir`` holds a model (without ``resume``/``overwrite``), is the base
            model's own folder, or holds checkpoints of another fine-tuning run.
    """
    if recipe.base_model is None:
        raise RecipeError("no base model: name a saved ensemble folder or Hub id (MODEL, or `base_model`)")
    if recipe.dataset is None:
        raise RecipeError("no dataset to fine-tune on: pass --dataset (or set `dataset` in the recipe)")
    output_dir = Path(output_dir)
    # before the trainer's Accelerator, which reads ACCELERATE_USE_CPU itself (PartialState does not)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    base = EnsembleModel.from_pretrained(recipe.base_model, revision=recipe.revision)
    if base.source_dir is not None and output_dir.resolve() == base.source_dir.resolve():
        raise FreeTicketsError(f"{output_dir} is the base model's own folder: choose another --output-dir")
    if search_lr and from_scratch:
        raise RecipeError("--search-lr tunes the fine-tuning LRs; give the from-scratch baseline its LRs with --set")
    prepare_run_dir(output_dir, state, resume=resume, overwrite=overwrite)
    try:
        return _finetune(recipe, base, output_dir, state, resume, max_steps, report_to, from_scratch, search_lr)
    except BaseException:
        # a run that left no checkpoint has nothing to resume: leave nothing that would refuse its rerun
        if state.is_main_process and latest_checkpoint(output_dir) is None:
            shutil.rmtree(output_dir / CHECKPOINTS, ignore_errors=True)
        raise


def _finetune(
    recipe: FineTuneRecipe,
    base: EnsembleModel,
    output_dir: Path,
    state: PartialState,
    resume: bool,
    max_steps: int | None,
    report_to: str | None,
    from_scratch: bool,
    search_lr: bool,
) -> dict[str, Any]:
    """:func:`finetune` once its output folder is ready."""
    lineage = _lineage(recipe.base_model, base)
    sparse = any(base.masks)
    data = load_image_data(recipe.training_recipe(base.config, sparse=sparse))
    scores: list[dict[str, float]] = []
    if search_lr:
        recipe, scores = _search_lr(recipe, base, data, lineage, output_dir / CHECKPOINTS / "lr_search", state)
    _check_lineage(output_dir, state, lineage, recipe, resume=resume)
    training = recipe.training_recipe(base.config, sparse=sparse)
    state.print(
        f"fine-tuning {recipe.base_model} ({base.config.ensemble.method}, M={base.num_members}) in {recipe.mode} "
        f"mode: augment {recipe.augment}, {recipe.epochs} epochs per member ({recipe.warmup_epochs} warm-up), "
        f"lr {recipe.lr:g} (heads), backbone_lr {recipe.backbone_lr:g}"
    )
    start = _FineTune(recipe, base, data, lineage, lr_search=scores)
    if from_scratch:
        if recipe.mode == "linear-probe":
            raise RecipeError("a linear probe of a random backbone is no baseline: use frozen-masks or dst")
        return train(training, output_dir, resume=resume, max_steps=max_steps, report_to=report_to, data=start.data)
    return train(
        training, output_dir, resume=resume, max_steps=max_steps, report_to=report_to, data=start.data, start=start
    )


class _FineTune:
    """Where each member starts (the base member, a new head) and what the summary adds (a ``MemberStart``)."""

    def __init__(
        self,
        recipe: FineTuneRecipe,
        base: EnsembleModel,
        data: ImageData,
        lineage: dict[str, Any],
        *,
        lr_search: list[dict[str, float]] | None = None,
    ) -> None:
        self.recipe, self.base, self.lineage, self.lr_search = recipe, base, lineage, lr_search or []
        cfg = base.config
        pretrained_cfg = resolve_pretrained_cfg(recipe, cfg, len(data.label_names))
        self.data = _fit_data(data, pretrained_cfg, recipe)
        self.new_heads = cfg.label_names != data.label_names or cfg.num_classes != len(data.label_names)
        self.config = EnsembleConfig(
            architecture=cfg.architecture,
            num_classes=len(data.label_names),
            model_args=dict(cfg.model_args),
            label_names=list(data.label_names),
            pretrained_cfg=pretrained_cfg,
            ensemble=EnsembleInfo(
                method=cfg.ensemble.method,
                num_members=base.num_members,
                sparsity=cfg.ensemble.sparsity,
                distribution=cfg.ensemble.distribution,
                member_widths=[self._member_widths(i, len(data.label_names)) for i in range(base.num_members)],
            ),  # no calibration: the base model's temperature was fitted on another task
        )

    def _member_widths(self, index: int, num_classes: int) -> dict[str, list[int]] | None:
        """A slim base member keeps its channels; only a new head changes its classifier's out width."""
        widths = self.base.config.ensemble.widths_of(index)
        if widths is None or not self.new_heads:
            return widths
        head = _classifier_weight(self.base.members[index]).removesuffix(".weight")
        return {**widths, head: [num_classes, *widths[head][1:]]}

    def create_member(self, index: int, seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
        member = copy.deepcopy(self.base.members[index]).train()
        masks = {name: mask.clone() for name, mask in self.base.masks[index].items()}
        if not self.new_heads:
            return member, masks
        name = _classifier_weight(member)
        old = dict(member.named_parameters())[name]
        density = masks[name].float().mean().item() if name in masks else 1.0  # what the distribution gave it
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            member.reset_classifier(self.config.num_classes)
        weight = dict(member.named_parameters())[name]
        if weight.dim() != old.dim():
            raise FreeTicketsError(f"{type(member).__name__}: the new classifier {name} has another kind of layer")
        shape = tuple(weight.shape)
        count = nonzero_counts({name: shape}, {name: density})[name]
        masks.pop(name, None)
        if count < weight.numel():
            masks[name] = draw_masks({name: shape}, {name: count}, torch.Generator().manual_seed(seed))[name]
            with torch.no_grad():
                weight.mul_(masks[name])
        return member, masks

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        return param_groups(model, self.recipe)

    def set_train_mode(self, model: torch.nn.Module) -> None:
        if self.recipe.mode == "linear-probe":  # frozen means batch-norm statistics too
            model.eval()
            model.get_classifier().train()

    def extend_summary(self, summary: dict[str, Any], model: EnsembleModel, data: ImageData) -> None:
        device = PartialState().device
        before = _diversity(self.base, data, self.recipe.eval_batch_size, device, labelled=not self.new_heads)
        after = _diversity(model, data, self.recipe.eval_batch_size, device)
        summary.update(self.lineage, base_model_relation="finetune")
        summary["finetune"] = {
            "mode": self.recipe.mode,
            "recipe": self.recipe.to_dict(),
            "new_heads": self.new_heads,
            "lr_search": self.lr_search,  # the --search-lr candidates with their validation NLL, or []
            "base_label_names": self.base.config.label_names,
            "diversity": {
                "before": {**before, "label_space": "base" if self.new_heads else "same"},
                "after": after,
            },
        }
        if self.recipe.mode == "linear-probe":
            _linear_probe_costs(summary["costs"], model, data)


def param_groups(model: torch.nn.Module, recipe: FineTuneRecipe) -> list[dict[str, Any]]:
    """The training loop's weight-decay groups (:func:`~.train.weight_decay_groups`), each split into the
    backbone at ``backbone_lr / lr`` of the scheduled LR (frozen in a linear probe) and the head at 1."""
    groups = weight_decay_groups(model, recipe.weight_decay, recipe.filter_bias_and_bn)  # before freezing
    head = {id(p) for p in model.get_classifier().parameters()}
    scales = {False: recipe.backbone_lr / recipe.lr, True: 1.0}  # by "is a head parameter"
    if recipe.mode == "linear-probe":  # kept in the optimizer (the sparse engine checks it holds every weight)
        scales[False] = 0.0
        for param in model.parameters():
            param.requires_grad_(id(param) in head)
    parts = [
        {**group, "params": [p for p in group["params"] if (id(p) in head) is is_head], "lr_scale": scale}
        for is_head, scale in sorted(scales.items())
        for group in groups
    ]
    return [part for part in parts if part["params"]]


def search_lr(recipe: FineTuneRecipe, work_dir: str | Path) -> tuple[FineTuneRecipe, list[dict[str, float]]]:
    """``recipe`` with the LR pair of lowest validation NLL among :func:`~.lr_search.candidates`, and the scores.

    The short runs are written under ``work_dir`` and removed afterwards; ``finetune(search_lr=True)`` runs
    this before fine-tuning.
    """
    if recipe.base_model is None or recipe.dataset is None:
        raise RecipeError("--search-lr needs a base model and a dataset")
    base = EnsembleModel.from_pretrained(recipe.base_model, revision=recipe.revision)
    data = load_image_data(recipe.training_recipe(base.config, sparse=any(base.masks)))
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    return _search_lr(recipe, base, data, _lineage(recipe.base_model, base), Path(work_dir), state)


def _search_lr(
    recipe: FineTuneRecipe,
    base: EnsembleModel,
    data: ImageData,
    lineage: dict[str, Any],
    work_dir: Path,
    state: PartialState,
) -> tuple[FineTuneRecipe, list[dict[str, float]]]:
    """Score each :func:`~.lr_search.candidates` LR pair with a short run; ``recipe`` with the best one."""
    scored = []
    for index, candidate in enumerate(lr_search.candidates(recipe)):
        short = lr_search.search_recipe(recipe, candidate)
        run_dir = work_dir / str(index)
        start = _FineTune(short, base, data, lineage)
        train(short.training_recipe(base.config, sparse=any(base.masks)), run_dir, data=start.data, start=start)
        state.wait_for_everyone()
        nll = lr_search.validation_nll(EnsembleModel.from_pretrained(run_dir), start.data, recipe.eval_batch_size)
        state.print(f"--search-lr: lr {candidate.lr:g}, backbone_lr {candidate.backbone_lr:g}: val NLL {nll:.4f}")
        scored.append((candidate, nll))
    state.wait_for_everyone()
    if state.is_main_process:
        shutil.rmtree(work_dir)
    best = lr_search.pick(scored)
    table = [{"lr": c.lr, "backbone_lr": c.backbone_lr, "val_nll": nll} for c, nll in scored]
    return dataclasses.replace(recipe, lr=best.lr, backbone_lr=best.backbone_lr), table


def _lineage(name: str, base: EnsembleModel) -> dict[str, Any]:
    """Base (a Hub id as given, a folder by its last part only), whether it was a Hub id, the Hub commit it
    resolved to (None for a folder) and its weights' SHA-256.

    Whether the base is a repo id is decided here, where ``name`` was resolved: the card rendered later,
    from another working folder, must never turn a local base into a link to the Hub.
    """
    source = base.source_dir
    assert source is not None  # from_pretrained sets it
    commit = source.name if source.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", source.name) else None
    digest = hashlib.sha256()
    with open(source / WEIGHTS_NAME, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    local = Path(name).is_dir()  # from_pretrained reads a folder that exists, else a Hub id
    return {
        "base_model": Path(name).resolve().name if local else name,  # no machine path in the artifact
        "base_model_is_repo_id": not local,
        "base_model_revision": commit,
        "base_model_sha256": digest.hexdigest(),
    }


def _check_lineage(
    output_dir: Path, state: PartialState, lineage: dict[str, Any], recipe: FineTuneRecipe, *, resume: bool
) -> None:
    """A resumed run must fine-tune the same weights with the same recipe as the run it continues."""
    path = output_dir / CHECKPOINTS / LINEAGE_NAME
    record = {"base_model_sha256": lineage["base_model_sha256"], "recipe": recipe.to_dict()}
    if resume and latest_checkpoint(output_dir) is not None and path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored != record:
            changed = [k for k in record["recipe"] if stored.get("recipe", {}).get(k) != record["recipe"][k]]
            if stored.get("base_model_sha256") != record["base_model_sha256"]:
                changed.insert(0, "base model weights")
            raise FreeTicketsError(f"cannot resume {output_dir}: its checkpoints fine-tune with other {changed}")
        return
    if state.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    state.wait_for_everyone()


def _fit_data(data: ImageData, cfg: dict[str, Any], recipe: FineTuneRecipe) -> ImageData:
    """The dataset as the base model sees it: its input size, channels, mean/std and resize rule."""
    input_size = tuple(int(v) for v in cfg["input_size"])
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    transform = None
    if data.streamed:
        mode = "L" if input_size[0] == 1 else "RGB"
        train, val, test = (_with_mode(s, mode) if s is not None else None for s in (data.train, data.val, data.test))
        transform = timm_train_transform(recipe, input_size, mean, std, cfg["interpolation"])
    else:
        train, val, test = (_fit_split(s, cfg) if s is not None else None for s in (data.train, data.val, data.test))
    assert train is not None and test is not None
    return ImageData(
        train,
        val,
        test,
        data.label_names,
        input_size,  # type: ignore[arg-type]
        mean,
        std,
        float(cfg["crop_pct"]),
        str(cfg["interpolation"]),
        train_transform=transform,
    )


def _with_mode(split: Split, mode: str) -> Split:
    assert isinstance(split, StreamedSplit)
    return StreamedSplit(split.table, split.image_col, mode, split.labels)


def _fit_split(split: Split, cfg: dict[str, Any]) -> ImageSplit:
    """uint8 images resized and cropped exactly as ``EnsembleModel.predict`` preprocesses them."""
    assert isinstance(split, ImageSplit)
    if split.images.shape[1] == cfg["input_size"][0] and is_input_sized(split.images.shape[2:], cfg):
        return split
    arrays = split.images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C) for PIL
    arrays = arrays[..., 0] if arrays.shape[-1] == 1 else arrays
    return ImageSplit(fit_images(list(arrays), cfg), split.labels)


def _classifier_weight(member: torch.nn.Module) -> str:
    """``state_dict`` name of the weight of timm's ``get_classifier()`` layer."""
    head = member.get_classifier()
    for name, module in member.named_modules():
        if module is head and isinstance(getattr(module, "weight", None), torch.nn.Parameter):
            return f"{name}.weight"
    raise FreeTicketsError(f"{type(member).__name__}: its classifier has no weight to replace")


@torch.inference_mode()
def _diversity(
    model: EnsembleModel, data: ImageData, batch_size: int, device: torch.device, *, labelled: bool = True
) -> dict[str, Any]:
    """Prediction diversity (disagreement, KL, mutual information) on the test split, the members'
    feature similarity (linear CKA of the pooled pre-logit features) and their masks' distance;
    accuracies only when ``labelled`` (the model predicts the split's labels)."""
    model.to(device).eval()
    logits, features = [], []
    for member in model.members:
        member_features, member_logits = [], []
        for images in data.eval_batches(data.test, batch_size, device):
            maps = member.forward_features(images)
            member_features.append(member.forward_head(maps, pre_logits=True).float().cpu())
            member_logits.append(member.forward_head(maps).float().cpu())
        features.append(torch.cat(member_features))
        logits.append(torch.cat(member_logits))
    model.cpu()
    member_logits = torch.stack(logits)  # (M, N, K)
    out = combine_member_logits(member_logits, 1.0)
    pairs = prediction_diversity(member_logits)
    masks = mask_distance(model.masks)
    num = model.num_members
    cka = [[_linear_cka(features[i], features[j]) for j in range(num)] for i in range(num)]
    off_diagonal = [cka[i][j] for i in range(num) for j in range(num) if i != j]
    scores = split_metrics(member_logits, data.test.labels, 1.0) if labelled else None
    return {
        "accuracy": scores["ensemble"]["accuracy"] if scores else None,
        "member_accuracy": [scores[f"member_{i}"]["accuracy"] for i in range(num)] if scores else None,
        "disagreement": out.disagreement.mean().item(),  # share of members off the ensemble's top-1
        "pairwise_disagreement": pairs["disagreement"]["mean"],
        "pairwise_kl": pairs["kl"]["mean"],
        "mutual_information": out.mutual_information.mean().item(),
        "feature_cka": sum(off_diagonal) / len(off_diagonal) if off_diagonal else None,  # one member: none
        "mask_jaccard_distance": masks["overall"]["jaccard"]["mean"] if masks else None,
        "matrices": {"disagreement": pairs["disagreement"]["matrix"], "kl": pairs["kl"]["matrix"], "feature_cka": cka},
    }


def _linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment of two ``(N, D)`` feature sets (Kornblith et al., 2019): 1 = same."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    cross = (x.T @ y).norm() ** 2
    denominator = (x.T @ x).norm() * (y.T @ y).norm()
    return (cross / denominator).item() if denominator > 0 else 0.0


def _linear_probe_costs(costs: dict[str, Any], model: EnsembleModel, data: ImageData) -> None:
    """A linear probe runs the backbone forward only: one sparse forward plus the heads' backward per image."""
    member = model.members[0]
    name = _classifier_weight(member)
    head = layer_flops(member, data.input_size).per_weight[name]
    density = model.masks[0][name].float().mean().item() if name in model.masks[0] else 1.0
    images = costs["train_images_processed"]
    costs["training_flops"] = images * (costs["inference_flops_member"] + 2 * head * density)
    dense = costs["training_flops_dense_same_steps"]
    costs["training_flops_ratio_vs_dense_same_steps"] = costs["training_flops"] / dense if dense else 0.0


def format_diversity(summary: dict[str, Any]) -> str:
    """Diversity of the members on the new test split, before and after fine-tuning, as a table."""
    diversity = summary["finetune"]["diversity"]
    keys = ("disagreement", "pairwise_kl", "mutual_information", "feature_cka", "mask_jaccard_distance")
    rows = [f"{'diversity':<10} " + " ".join(f"{k:>21}" for k in keys)]
    for when in ("before", "after"):
        values = [diversity[when][k] for k in keys]
        rows.append(f"{when:<10} " + " ".join(f"{v:>21.4f}" if v is not None else f"{'n/a':>21}" for v in values))
    if diversity["before"]["label_space"] == "base":
        rows.append("(before: the base members with their own heads, in the base model's label space)")
    return "\n".join(rows)
