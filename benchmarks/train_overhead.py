"""Per-step wall time of sparse training (SparseEngine) relative to dense training, in one run.

The same model, data and steps are trained dense and with the sparse engine (with an update
interval small enough to include several prune/regrow updates); blocks of steps alternate between
the two so that machine noise hits both alike. Target on the 2-core CPU: sparse/dense <= 1.15.

    python benchmarks/train_overhead.py [--arch cifar_wrn10_2] [--steps 60] [--update-interval 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import freetickets_hub.model.architectures  # noqa: F401
from freetickets_hub.training.data import augment_batch, normalize
from freetickets_hub.training.sparsity import SparseEngine, SparsityConfig

TARGET = 1.15
MEAN, STD = torch.tensor([0.286]), torch.tensor([0.353])


def _block(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    engine: SparseEngine | None,
    images: list[torch.Tensor],
    labels: list[torch.Tensor],
    steps: int,
    first_step: int,
    rng: torch.Generator,
) -> list[float]:
    """Time ``steps`` full training steps (augment, forward, backward, step, masks)."""
    times = []
    for i in range(steps):
        start = time.perf_counter()
        batch = augment_batch(images[i % len(images)], "pad_crop_flip", 2, rng)
        loss = torch.nn.functional.cross_entropy(model(normalize(batch, MEAN, STD)), labels[i % len(labels)])
        loss.backward()
        optimizer.step()
        if engine is not None:
            engine.step(first_step + i + 1)
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cifar_wrn10_2")
    parser.add_argument("--steps", type=int, default=60, help="steps per method and block")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--update-interval", type=int, default=10)
    parser.add_argument("--growth", default="gradient", choices=["gradient", "random"])
    args = parser.parse_args()
    torch.manual_seed(0)
    images = [torch.randint(0, 256, (args.batch_size, 1, 28, 28), dtype=torch.uint8) for _ in range(8)]
    labels = [torch.randint(0, 10, (args.batch_size,)) for _ in range(8)]
    runs = {}
    for name in ("dense", "sparse"):
        model = timm.create_model(args.arch, num_classes=10, in_chans=1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        engine = None
        if name == "sparse":
            config = SparsityConfig(sparsity=0.8, growth=args.growth, update_interval=args.update_interval)
            engine = SparseEngine(model, optimizer, config, seed=0)
        runs[name] = (model, optimizer, engine)
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    rng = torch.Generator().manual_seed(0)
    for model, optimizer, engine in runs.values():  # warm-up
        _block(model, optimizer, engine, images, labels, 5, 10_000, rng)
    for block in range(args.blocks):
        for name, (model, optimizer, engine) in runs.items():
            times[name] += _block(model, optimizer, engine, images, labels, args.steps, block * args.steps, rng)
    updates = runs["sparse"][2].num_updates
    dense, sparse = (statistics.mean(times[k]) for k in ("dense", "sparse"))
    print(f"{args.arch}, batch {args.batch_size}, {torch.get_num_threads()} threads, {len(times['dense'])} steps each")
    print(f"sparse engine: {updates} mask updates (every {args.update_interval} steps, {args.growth} growth)")
    print(f"dense  {dense * 1e3:8.2f} ms/step (median {statistics.median(times['dense']) * 1e3:.2f})")
    print(f"sparse {sparse * 1e3:8.2f} ms/step (median {statistics.median(times['sparse']) * 1e3:.2f})")
    ratio = sparse / dense
    print(
        f"ratio sparse/dense (mean per step, updates included): {ratio:.3f}  target <= {TARGET}: "
        f"{'PASS' if ratio <= TARGET else 'MISS'}"
    )


if __name__ == "__main__":
    main()
