"""``model.safetensors`` is reproducible: the same ensemble gives the same bytes, save after save."""

from __future__ import annotations

import hashlib
from pathlib import Path

from safetensors import safe_open

from freetickets_hub import EnsembleModel

from .test_onnx_export import make_ensemble


def test_saving_the_same_ensemble_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    model = make_ensemble()
    digests = set()
    for attempt in range(6):  # safetensors alone orders __metadata__ at random: 6 saves agree by chance 1 in 7776
        model.save_pretrained(tmp_path / str(attempt))
        digests.add(hashlib.sha256((tmp_path / str(attempt) / "model.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    header = (tmp_path / "0" / "model.safetensors").read_bytes()[8:200]
    assert header.startswith(b'{"__metadata__":{"format":"pt","library":"freetickets-hub","values_dtype":"float32"}')
    with safe_open(str(tmp_path / "0" / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "library": "freetickets-hub", "values_dtype": "float32"}
    loaded = EnsembleModel.from_pretrained(tmp_path / "0")
    assert all((a == b).all() for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True))
