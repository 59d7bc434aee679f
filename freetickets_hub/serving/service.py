"""The data plane both dialects share: the model, its batcher, its metrics and its lifecycle.

Routes (``v1.py``, ``v2.py``) stay thin: they decode, call ``Service.infer`` and encode. The model
loads in the background once the server listens, so ``/v2/health/live`` answers at once and
``/v2/health/ready`` turns 200 only after the engine is loaded and warmed up; on SIGTERM
``begin_drain`` turns readiness 503 and refuses new work while in-flight requests finish.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from freetickets_hub.errors import ConfigError

from .batcher import BatchResult, MicroBatcher, Reservation
from .engine import BACKENDS, ServingEngine, load_engine
from .errors import InvalidInput, ModelNotFound, ServerBusy, ServerNotReady
from .metrics import ServingMetrics
from .predict import decode_images

__all__ = ["ServeSettings", "Service"]

logger = logging.getLogger(__name__)

SETTINGS_ENV = "FREETICKETS_SERVE_SETTINGS"  # how `--workers N` hands the settings to each worker process
DECODE_WORKERS = 4  # at most this many images decode at once (fewer on fewer cores); admission bounds the rest


@dataclass
class ServeSettings:
    """What ``freetickets serve`` was asked for (its flags)."""

    model: str
    backend: str = "onnx"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32
    max_delay_ms: float = 5.0
    max_queue: int = 256  # images admitted and not answered yet (queued or in the engine call)
    max_body_mb: float = 16.0
    workers: int = 1
    name: str | None = None  # default: the last part of MODEL
    variant: str = "fp32"  # the graph backends' graph: fp32 (onnx/model.onnx) or int8 (onnx/model.int8.onnx)
    drain_timeout_s: float = 30.0  # on SIGTERM, the longest time until the process exits
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this long
    body_timeout_s: float = 30.0  # a request body not received whole within this long gets 408
    docs: bool = False  # serve Swagger UI at /docs and ReDoc at /redoc (their assets load from a CDN)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {BACKENDS}, got {self.backend!r}")
        for flag, value, low in (
            ("--max-batch-size", self.max_batch_size, 1),
            ("--max-queue", self.max_queue, 1),
            ("--workers", self.workers, 1),
            ("--max-delay-ms", self.max_delay_ms, 0),
            ("--max-body-mb", self.max_body_mb, 1e-6),
            ("--keep-alive-s", self.keep_alive_s, 1),
            ("--body-timeout-s", self.body_timeout_s, 0.001),
            ("--drain-timeout-s", self.drain_timeout_s, 1),
        ):
            if value < low:
                raise ConfigError(f"{flag} must be at least {low}, got {value}")
        if self.max_queue < self.max_batch_size:
            raise ConfigError(
                f"--max-queue ({self.max_queue}) must be at least --max-batch-size ({self.max_batch_size})"
            )
        if not self.name:
            self.name = Path(str(self.model).rstrip("/\\")).name or str(self.model)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls) -> ServeSettings:
        return cls(**json.loads(os.environ[SETTINGS_ENV]))


class Service:
    """One served model: load it, batch its requests, count what happens, drain on shutdown."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.name: str = settings.name or settings.model
        self.metrics = ServingMetrics()
        self.engine: ServingEngine | None = None
        self.batcher: MicroBatcher | None = None
        self.draining = False
        self.failure: str | None = None  # why loading failed; the server then exits
        # image decoding runs here, bounded, and only for admitted requests (Service.reserve)
        self._decoders = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(DECODE_WORKERS, os.cpu_count() or 1), thread_name_prefix="decode"
        )
        self.in_flight = 0  # HTTP requests being answered (probes and metrics excluded)
        self._loading: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.batcher is not None and not self.draining

    async def start(self) -> None:
        """Load the engine in the background; the server listens meanwhile (live, not ready)."""
        self._loading = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        try:
            engine = await asyncio.to_thread(
                load_engine, self.settings.model, self.settings.backend, self.settings.variant
            )
        except Exception as err:  # the server cannot serve: say why, then exit (server.py)
            self.failure = f"cannot load {self.settings.model}: {err}"
            logger.error("%s", self.failure)
            return
        batcher = MicroBatcher(
            engine,
            batch_axes={spec.name: spec.batch_axis for spec in engine.outputs},
            max_batch_size=self.settings.max_batch_size,
            max_delay_s=self.settings.max_delay_ms / 1000,
            max_queue=self.settings.max_queue,
            on_batch=self.metrics.observe_batch,
        )
        await batcher.start()
        self.metrics.queue_depth.set_function(lambda: batcher.queued_images)
        self.metrics.admitted.set_function(lambda: batcher.admitted_images)
        self.engine, self.batcher = engine, batcher
        logger.info("serving %s (%s backend, providers %s)", self.name, engine.backend, engine.providers)

    async def stop(self) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        if self.batcher is not None:
            await self.batcher.close()
        self._decoders.shutdown(wait=True)

    def begin_drain(self) -> None:
        self.draining = True

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and (self.batcher is None or self.batcher.idle)

    def require_engine(self) -> ServingEngine:
        """The loaded engine, for requests that need it.

        Raises:
            ServerNotReady: still loading.
        """
        if self.engine is None:
            raise ServerNotReady("the model is still loading; poll /v2/health/ready")
        return self.engine

    def check_model(self, name: str, version: str | None = None) -> ServingEngine:
        """The engine, when ``name`` (and ``version``, if given) is the served model.

        Raises:
            ModelNotFound: another name or a version other than 1.
            ServerNotReady: still loading.
        """
        if name != self.name:
            raise ModelNotFound(f"unknown model {name!r}; this server serves {self.name!r}")
        if version not in (None, "", "1"):
            raise ModelNotFound(f"model {name!r} has no version {version!r}; it has version '1'")
        return self.require_engine()

    def check_capacity(self) -> None:
        """Refuse work before its body is read when not even one more image fits (an overload's cheap 503).

        Raises:
            ServerBusy: shutting down, or no room (the batcher's queue limit or wait budget).
            ServerNotReady: still loading.
        """
        if self.draining:
            raise ServerBusy("the server is shutting down; retry on another replica")
        self.require_engine()
        assert self.batcher is not None
        if not self.batcher.has_room():
            raise self.batcher.refuse()

    def reserve(self, count: int) -> Reservation:
        """Admit a request of ``count`` images before decoding them (decoding is shed like model work).

        Raises:
            ServerBusy: shutting down, or no room (the batcher's queue limit or wait budget).
            ServerNotReady: still loading.
        """
        if self.draining:
            raise ServerBusy("the server is shutting down; retry on another replica")
        self.require_engine()
        assert self.batcher is not None
        return self.batcher.reserve(count)

    def release(self, reservation: Reservation) -> None:
        """Give an admitted request's room back (a no-op once :meth:`infer` queued it)."""
        if self.batcher is not None:
            self.batcher.release(reservation)

    async def decode(self, blobs: list[tuple[str, bytes]]) -> np.ndarray:
        """Decode and fit images to the model's input in the bounded decoding pool.

        Raises:
            InvalidInput: a blob is empty, not an allowed format, broken, or over a size limit.
        """
        config = self.require_engine().config
        return await asyncio.get_running_loop().run_in_executor(self._decoders, decode_images, blobs, config)

    async def infer(self, pixel_values: np.ndarray, reservation: Reservation | None = None) -> BatchResult:
        """Run ``pixel_values`` through the batcher (in the room ``reservation`` holds, when given).

        Raises:
            ServerBusy: shutting down, or no room (the batcher's queue limit or wait budget).
            ServerNotReady: still loading.
            InvalidInput: more images than ``--max-batch-size``.
        """
        if self.draining:
            raise ServerBusy("the server is shutting down; retry on another replica")
        self.require_engine()
        assert self.batcher is not None
        result = await self.batcher.submit(pixel_values, reservation)
        self.metrics.queue_latency.observe(result.queue_s)
        bad = [name for name, value in result.outputs.items() if not np.isfinite(value).all()]
        if bad:  # JSON has no NaN: e.g. finite inputs near 3e38 overflow inside the model
            raise InvalidInput(
                f"the model's outputs {bad} are not finite for this input; send normalised pixel values "
                "(the model's mean/std, see /v1/metadata pretrained_cfg)"
            )
        return result

    def metadata(self) -> dict[str, Any]:
        """``GET /v1/metadata``: the model, its calibration and abstention settings, how it is served."""
        engine = self.require_engine()
        config, info = engine.config, engine.config.ensemble
        selective = dataclasses.asdict(info.selective) if info.selective is not None else None
        return {
            "name": self.name,
            "architecture": config.architecture,
            "labels": config.label_names or [str(i) for i in range(config.num_classes)],
            "num_classes": config.num_classes,
            "members": info.num_members,
            "method": info.method,
            "sparsity": info.sparsity,
            "distribution": info.distribution,
            "temperature": info.temperature,
            "calibration": dataclasses.asdict(info.calibration) if info.calibration else None,
            "selective": selective,
            "backend": engine.backend,
            "variant": self.settings.variant,
            "providers": engine.providers,
            "versions": engine.versions(),
            "pretrained_cfg": config.pretrained_cfg,
            "input": engine.input.to_dict(),
            "outputs": [spec.to_dict() for spec in engine.outputs],
            "batching": {
                "max_batch_size": self.settings.max_batch_size,
                "max_delay_ms": self.settings.max_delay_ms,
                "max_queue": self.settings.max_queue,
            },
            "max_body_mb": self.settings.max_body_mb,
            "workers": self.settings.workers,
            "pid": os.getpid(),
        }
