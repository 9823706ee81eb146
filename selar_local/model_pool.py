"""Models on demand: the models a server can serve, loaded by the name a request gives.

A `ModelPool` knows every model it may serve (registry models present on this machine,
`.gguf` files of a folder, or one model loaded at start) and keeps at most `max_loaded`
of them in memory. A request takes a `Lease` on its model for its whole life: the first
request for a model loads it (the self-check, the calibration cache and the model's
sampler, as `Selar` always does), requests arriving meanwhile wait (at most `queue_size`
waiters in all, QueueFullError past it), and a model is unloaded only when no lease is
held on it: when its idle time (`keep_alive`) has passed, or when another model needs
its place. Unloading closes its scheduler and its llama.cpp context and model, which
frees the KV cells and the weights.

Loading happens outside the pool's lock: a request for a model already loaded never
waits for another model's load; one for a model that needs the place of a busy model
waits until that model's requests end.
"""
from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

from selar_local.engine import return_freed_memory
from selar_local.openai_schema import RequestError
from selar_local.scheduler import QueueFullError, SchedulerClosedError, SchedulerStats

FOREVER = None  # keep_alive: never unload for idleness


class ModelUnavailableError(RequestError):
    """The model's file could not be loaded (missing, corrupt, unsupported)."""

    def __init__(self, model_id: str, detail: str):
        super().__init__(f"model {model_id!r} could not be loaded: {detail}", param="model",
                         code="model_load_failed", status=500)


@dataclass
class ServedModel:
    """One model the pool may serve, and its state."""

    id: str
    path: Path
    aliases: frozenset[str]
    pinned: bool = False  # loaded at start and never unloaded (`selar serve --model`)
    selar: Any = None  # the loaded Selar, or None
    loading: bool = False
    unloading: bool = False
    draining: bool = False  # another model waits for its place: new requests wait, live ones finish
    leases: int = 0
    last_used: float = 0.0
    expires_at: float | None = None  # when an idle model is unloaded (None: never)
    loads: int = 0
    load_seconds: float = 0.0  # the last load's duration
    load_seconds_total: float = 0.0
    error: str | None = None  # the last load's failure

    @property
    def busy_or_present(self) -> bool:
        """Holds (or is about to hold, or has not yet given back) a model's memory."""
        return self.selar is not None or self.loading or self.unloading


@dataclass
class Lease:
    """A request's hold on a loaded model; `release()` once the request has ended."""

    pool: "ModelPool"
    model: ServedModel
    selar: Any
    load_seconds: float = 0.0  # time this request spent waiting for the model to load
    keep_alive: float | None | str = "default"
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.pool._release(self)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ModelPool:
    """The models a server serves, at most `max_loaded` in memory (thread-safe)."""

    def __init__(self, models: Iterable[ServedModel], *, load: Callable[[ServedModel], Any] | None = None,
                 max_loaded: int = 1, keep_alive: float | None = 300.0, queue_size: int = 32):
        """load(model): a Selar for the model (None: only pinned models are served)."""
        self.models: dict[str, ServedModel] = {}
        for model in models:
            self.models.setdefault(model.id, model)
        if not self.models:
            raise ValueError("a model pool needs at least one model")
        if max_loaded < 1:
            raise ValueError("max_loaded must be >= 1")
        self._load = load
        self.on_load: list[Callable[[ServedModel], None]] = []  # called after each load (metrics)
        self.max_loaded = max(max_loaded, sum(m.pinned for m in self.models.values()))
        self.keep_alive = keep_alive
        self.queue_size = queue_size
        self._cond = threading.Condition()
        self._waiters = 0
        self._closed = False
        self.created = int(time.time())
        self._reaper = threading.Thread(target=self._reap, name="selar-model-reaper", daemon=True)
        self._reaper.start()

    @classmethod
    def single(cls, selar) -> "ModelPool":
        """A pool of one model already loaded, never unloaded."""
        model = ServedModel(selar.model_id, Path(selar.runtime.model_path), frozenset(selar.builder.aliases),
                            pinned=True, selar=selar, last_used=time.monotonic(), loads=1)
        return cls([model], keep_alive=FOREVER)

    # -- names ----------------------------------------------------------------------------
    def resolve(self, name: Any) -> ServedModel:
        """The model a request's `model` names; None or "": the one most recently used."""
        if name is None or name == "":
            return max(self.models.values(), key=lambda m: (m.selar is not None, m.last_used))
        if isinstance(name, str):
            if name in self.models:
                return self.models[name]
            for model in self.models.values():
                if name in model.aliases:
                    return model
        raise RequestError(f"model {name!r} is not served here; this server serves "
                           f"{', '.join(repr(m) for m in self.models)}", param="model", code="model_not_found",
                           status=404)

    # -- leases ---------------------------------------------------------------------------
    def acquire(self, name: Any, *, keep_alive: float | None | str = "default") -> Lease:
        """Hold the model `name` loaded (loading it, or waiting for its place, if needed).
        keep_alive: how long it stays loaded once idle after this request (seconds; None:
        forever; 0: unload at once); "default": the pool's."""
        model = self.resolve(name)
        started = time.monotonic()
        ready_at_once = True  # False once this request had to wait for, or do, a load
        counted = False  # counted among the waiters (bounded by queue_size)
        try:
            while True:
                victim = None
                with self._cond:
                    if self._closed:
                        raise SchedulerClosedError("the server is shutting down")
                    if model.selar is not None and not model.unloading and not model.draining:
                        model.leases += 1
                        model.last_used = time.monotonic()
                        waited = 0.0 if ready_at_once else time.monotonic() - started
                        return Lease(self, model, model.selar, waited, keep_alive)
                    ready_at_once = False
                    load_here, present = False, []
                    if model.selar is None and not model.loading and not model.unloading:
                        if self._load is None:
                            raise ModelUnavailableError(model.id, "this server loads no models on demand")
                        present = [m for m in self.models.values() if m.busy_or_present]
                        if len(present) >= self.max_loaded:
                            victim = self._idle_victim(present)
                        load_here = len(present) < self.max_loaded or victim is not None
                    if not load_here:  # another request loads it, or its place is held: wait
                        if not counted:
                            if self._waiters >= self.queue_size:
                                raise QueueFullError(
                                    f"server busy: {self._waiters} requests are waiting for a model to load "
                                    f"(queue size {self.queue_size}); retry later")
                            self._waiters += 1
                            counted = True
                        if present:  # this request needs a place that a busy model holds
                            self._drain_one(present)
                        self._cond.wait(1.0)
                        continue
                    model.loading = True
                    if victim is not None:
                        victim.unloading = True
                try:
                    if victim is not None:
                        self._unload(victim)
                except BaseException:
                    with self._cond:
                        model.loading = False
                        self._cond.notify_all()
                    raise
                self._load_now(model)
        finally:
            if counted:
                with self._cond:
                    self._waiters -= 1

    def _drain_one(self, present: list[ServedModel]) -> None:
        """Make room without starving: the least recently used loaded model takes no new
        requests (they wait, as this one does) until its live ones end and it is unloaded."""
        if any(m.draining for m in present):
            return
        candidates = [m for m in present if m.selar is not None and not m.pinned and not m.unloading]
        if candidates:
            min(candidates, key=lambda m: m.last_used).draining = True

    def _idle_victim(self, present: list[ServedModel]) -> ServedModel | None:
        idle = [m for m in present if m.selar is not None and not m.pinned and m.leases == 0 and not m.unloading]
        return min(idle, key=lambda m: m.last_used) if idle else None

    def _load_now(self, model: ServedModel) -> None:
        """Load `model` (marked loading by the caller) outside the lock."""
        started = time.monotonic()
        try:
            if not model.path.is_file():
                raise FileNotFoundError(f"{model.path} does not exist (deleted while the server ran?)")
            selar = self._load(model)
        except BaseException as exc:
            with self._cond:
                model.loading = False
                model.error = f"{type(exc).__name__}: {exc}"
                self._cond.notify_all()
            raise ModelUnavailableError(model.id, model.error) from exc
        with self._cond:
            model.selar, model.loading, model.error = selar, False, None
            model.loads += 1
            model.load_seconds_total += time.monotonic() - started
            model.load_seconds = time.monotonic() - started
            model.last_used = time.monotonic()
            model.expires_at = None
            self._cond.notify_all()
        for callback in self.on_load:
            callback(model)

    def _release(self, lease: Lease) -> None:
        with self._cond:
            model = lease.model
            model.leases -= 1
            model.last_used = time.monotonic()
            keep = self.keep_alive if lease.keep_alive == "default" else lease.keep_alive
            if model.leases == 0:
                model.expires_at = None if keep is None or model.pinned else model.last_used + max(0.0, keep)
            self._cond.notify_all()

    def _unload(self, model: ServedModel) -> None:
        """Close an idle model (marked unloading by the caller): scheduler, context, weights."""
        selar = model.selar
        try:
            selar.close()
        finally:
            with self._cond:
                model.selar, model.draining, model.expires_at = None, False, None
            del selar
            # The closed model's Python side (its arrays) sits in reference cycles until a full
            # collection: collect now, then hand the freed heap back to the system. The model
            # stays "unloading" (in /health) until its memory is back, so that whoever waits
            # for the unload (a load of its own, a client reading RSS) sees it done.
            gc.collect()
            return_freed_memory()
            with self._cond:
                model.unloading = False
                self._cond.notify_all()

    def unload(self, name: Any) -> bool:
        """Unload a model now if it is loaded and idle (Ollama's keep_alive 0); True if done."""
        model = self.resolve(name)
        with self._cond:
            if model.selar is None or model.pinned or model.leases or model.unloading:
                return False
            model.unloading = True
        self._unload(model)
        return True

    def _reap(self) -> None:
        """Unload models idle past their keep-alive."""
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                due = [m for m in self.models.values() if m.selar is not None and not m.pinned and m.leases == 0
                       and not m.unloading and m.expires_at is not None and m.expires_at <= now]
                if not due:
                    deadlines = [m.expires_at for m in self.models.values()
                                 if m.selar is not None and m.expires_at is not None]
                    self._cond.wait(min(deadlines) - now if deadlines else None)
                    continue
                for model in due:
                    model.unloading = True
            for model in due:
                self._unload(model)

    def add(self, model: ServedModel) -> ServedModel:
        """Serve one more model (a pulled one); the one already served under its id if any."""
        with self._cond:
            return self.models.setdefault(model.id, model)

    # -- information ----------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """GET /health: the scheduler counters (summed over the loaded models) and the models."""
        loaded = self.loaded()
        totals: dict[str, int] = {}
        for model in loaded:
            for key, value in model.selar.scheduler.stats().to_dict().items():
                totals[key] = totals.get(key, 0) + value
        if not loaded:
            totals = {f.name: 0 for f in fields(SchedulerStats)}
            totals["queue_size"] = self.queue_size
        totals["slots_idle"] = totals["slots_total"] - totals["slots_busy"]
        totals["loading_waiters"] = self._waiters
        current = max(loaded, key=lambda m: m.last_used).id if loaded else None
        # Running tau calibrations (tau "auto" on a sampler not calibrated yet): model -> progress.
        calibrating = {m.id: m.selar.calibration for m in loaded if m.selar.calibration is not None}
        with self._cond:
            unloading = [m.id for m in self.models.values() if m.unloading]
        return {"status": "ok", "model": current, "models_loaded": [m.id for m in loaded],
                "models_unloading": unloading, "models_available": list(self.models), **totals,
                "calibrating": calibrating}

    def loaded(self) -> list[ServedModel]:
        with self._cond:
            return [m for m in self.models.values() if m.selar is not None]

    def listing(self) -> dict[str, Any]:
        """GET /v1/models: every model served, with whether it is loaded."""
        data = []
        for model in list(self.models.values()):
            selar = model.selar
            if selar is not None:
                entry = selar.models()["data"][0]
                entry["id"] = model.id
            else:
                entry = {"id": model.id, "object": "model", "created": self.created, "owned_by": "selar-local",
                         "meta": {"path": str(model.path)}}
            entry["meta"].update(loaded=selar is not None, loading=model.loading, loads=model.loads,
                                 load_seconds=round(model.load_seconds, 3), load_error=model.error)
            data.append(entry)
        return {"object": "list", "data": data}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            models = [m for m in self.models.values() if m.selar is not None]
            self._cond.notify_all()
        for model in models:
            model.selar.close()
            model.selar = None


# ------------------------------------------------------------------------ durations


def parse_duration(value: Any) -> float | None:
    """Seconds from a number or Ollama's forms ("30s", "5m", "1h", "500ms", "-1");
    negative: forever (None). Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text, scale = value.strip(), 1.0
        for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
            if text.endswith(suffix) and text != suffix:
                text, scale = text[:-len(suffix)], factor
                break
        seconds = float(text) * scale
    else:
        raise ValueError(f"invalid duration {value!r}")
    if seconds != seconds:  # NaN
        raise ValueError(f"invalid duration {value!r}")
    return None if seconds < 0 else seconds


def parse_keep_alive(value: Any) -> float | None | str:
    """A request's keep_alive (Ollama's): "default" or None -> the server's; else seconds."""
    if value is None or value == "default":
        return "default"
    try:
        return parse_duration(value)
    except ValueError:
        raise RequestError(f"invalid keep_alive={value!r}: seconds, or a duration such as \"5m\" or \"30s\" "
                           "(negative: keep loaded)", param="keep_alive") from None


# ------------------------------------------------------------------------ what to serve


def discover_models(names: Iterable[str] | None = None, models_dir: str | Path | None = None) -> list[ServedModel]:
    """The models `selar serve` without --model serves: `names` (registry names or paths),
    or else every registry model present on this machine; plus the .gguf files of
    `models_dir`."""
    from selar_local.api import model_identity
    from selar_local.registry import load_registry, local_path, resolve_model

    paths: list[Path] = []
    if names:
        paths = [Path(resolve_model(name)) for name in names]
    elif models_dir is None:
        for entry in load_registry().values():
            path = local_path(entry, assemble=False)
            if path is not None:
                paths.append(path)
    if models_dir is not None:
        folder = Path(models_dir)
        if not folder.is_dir():
            raise RequestError(f"--models-dir {folder} is not a folder")
        paths += sorted(p for p in folder.iterdir() if p.suffix == ".gguf" and p.is_file())
    served: dict[str, ServedModel] = {}
    for path in paths:
        model_id, aliases, _stops = model_identity(path)
        served.setdefault(model_id, ServedModel(model_id, path, frozenset(aliases)))
    return list(served.values())
