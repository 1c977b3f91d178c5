"""The host adapter store: PEDRO adapters read from disk and validated once, then kept in
host memory (pinned when a GPU is there) up to a bounded count, least recently used out.

It lives in the engine core beside the scheduler. The scheduler asks for an adapter when
a request arrives (`want`), so the read happens on a loader thread while the request
waits in the queue, never inside a model step; a request is scheduled once its adapter is
READY, and fails alone with the reason when it FAILED. What the store serves is exactly
what the front end validated: the bytes it reads must have the digest the request carries.

An entry is pinned while requests that still need their prefill refer to it; only an
unpinned entry is evicted, and a load waits for room rather than grow past the bound.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..adapter_io import parse_adapter, read_adapter_files
from ..config import AdapterError, AdapterMissingError, BaseShapes, PedroConfig
from .metrics import Histogram
from .request import PedroRequest, check_servable

logger = logging.getLogger("vllm_pedro")


@dataclass
class AdapterWeights:
    """A validated adapter's generators stacked over layers, in the serving dtype, on the
    host. up_w/up_b rows follow the adapter's own target columns (config.target_columns);
    the worker picks its tensor-parallel shard of each target when it writes a row."""

    config: PedroConfig
    digest: str
    down_w: torch.Tensor  # [L, r, d]
    down_b: torch.Tensor  # [L, r]
    up_w: torch.Tensor  # [L, out, r]
    up_b: torch.Tensor  # [L, out]
    pool_w: torch.Tensor | None  # [L, d], attention pooler only
    rat_num: torch.Tensor | None  # [L, 7], rational activation only
    rat_den: torch.Tensor | None  # [L, 5]

    @classmethod
    def build(cls, config: PedroConfig, digest: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
              pin: bool) -> AdapterWeights:
        L = config.base_shapes.num_layers

        def stack(name: str) -> torch.Tensor | None:
            key = f"generators.0.{name}"
            if key not in tensors:
                return None
            t = torch.stack([tensors[f"generators.{i}.{name}"] for i in range(L)]).to(dtype)
            return t.pin_memory() if pin else t

        return cls(config, digest, stack("down.weight"), stack("down.bias"), stack("up.weight"), stack("up.bias"),
                   stack("pool_w"), stack("rat_num"), stack("rat_den"))

    @property
    def nbytes(self) -> int:
        ts = (self.down_w, self.down_b, self.up_w, self.up_b, self.pool_w, self.rat_num, self.rat_den)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


class State(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    WAITING = "waiting"  # not loading: no room in the store until a pinned entry is released


@dataclass
class _Entry:
    ref: PedroRequest
    state: State = State.WAITING
    weights: AdapterWeights | None = None
    error: str | None = None
    pins: int = 0


@dataclass
class StoreStats:
    disk_reads: int = 0  # adapters read from disk (each read is one full load)
    load_seconds: float = 0.0  # loader-thread time spent reading, validating and stacking
    hits: int = 0  # requests whose adapter was in memory (or already loading) when they arrived
    misses: int = 0  # requests whose arrival started a read
    evictions: int = 0
    failures: int = 0
    failures_by_cause: dict[str, int] = field(default_factory=dict)  # metrics.FAILURE_CAUSES
    load_hist: Histogram = field(default_factory=Histogram)  # seconds per load


def default_capacity(base: BaseShapes, max_rank: int, dtype: torch.dtype, fraction: float = 0.1) -> int:
    """Adapters of rank max_rank that fit in `fraction` of the host memory (like vLLM
    sizes its caches), at least 1."""
    import psutil

    d, out = base.hidden_size, base.q_size + 2 * base.kv_size + base.ff_size
    per = base.num_layers * (d + max_rank * d + max_rank + 12 + out * max_rank + out) * dtype.itemsize
    return max(1, int(psutil.virtual_memory().total * fraction // per))


LOADER_NICE_ENV = "VLLM_PEDRO_LOADER_NICE"  # the loader threads' nice value (default 10; 0: the process's)


def loader_thread_init() -> None:
    """Loader-thread initializer: serial OpenMP, and a lower scheduling priority."""
    serial_openmp_in_this_thread()
    lower_this_threads_priority()


def lower_this_threads_priority() -> None:
    """Cold tenants keep the loader threads busy (read, sha256, validation: CPU work) while
    the model's OpenMP team has a thread bound to every core; at equal priority the kernel
    shares a core between them and the whole team waits at each barrier for its slowest
    thread. A higher nice value for the loader threads (Linux: per thread) lets them run in
    the team's idle moments and yields the cores to the model otherwise; a request whose
    adapter is cold waits a little longer instead of every running request slowing down."""
    try:
        nice = int(os.environ.get(LOADER_NICE_ENV, "10"))
    except ValueError:
        nice = 10
    if nice > 0:
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        except (AttributeError, OSError):
            pass  # not Linux, or not allowed: the threads keep the process's priority


def serial_openmp_in_this_thread() -> None:
    """Loader-thread initializer. A torch op that opens an OpenMP parallel region from a
    second thread makes OpenMP start a second team of worker threads, which then competes
    with the model's team for the same cores for the life of the process (measured on the
    2-core CPU: every decode step ~10% slower after the first adapter load). OpenMP's
    thread count is a per-thread setting, so setting it to 1 here keeps the loader's ops
    serial and leaves the model's threads alone. (torch.set_num_threads would also reset
    MKL's global count, and vLLM's CPU worker turns it into a no-op after binding threads.)"""
    torch.get_num_threads()  # torch's once-per-thread init sets the count; run it first, then override
    try:
        # The process's global symbol scope holds the OpenMP runtime torch calls (its own
        # libgomp, or an LD_PRELOADed libiomp5); other packages bundle private copies.
        ctypes.CDLL(None).omp_set_num_threads(1)
    except (AttributeError, OSError):
        pass  # no OpenMP runtime: torch ops cannot start a team either


class AdapterChangedError(AdapterError):
    """The adapter's files are not the bytes the front end validated."""


def failure_cause(e: BaseException) -> str:
    """The metrics label of a failed load (metrics.FAILURE_CAUSES)."""
    if isinstance(e, (FileNotFoundError, AdapterMissingError)):
        return "missing"
    if isinstance(e, AdapterChangedError):
        return "changed"
    return "invalid" if isinstance(e, AdapterError) else "io"


class HostAdapterStore:
    def __init__(self, base: BaseShapes, serving, dtype: torch.dtype, capacity: int, pin: bool = False,
                 loader_threads: int = 2):
        self.base, self.serving, self.dtype, self.pin = base, serving, dtype, pin
        self.capacity = capacity
        self.stats = StoreStats()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # digest -> entry, LRU first
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(loader_threads, thread_name_prefix="pedro-adapter-loader",
                                        initializer=loader_thread_init)

    # -- what the scheduler calls ---------------------------------------------------------
    def want(self, ref: PedroRequest, pin: bool = False, arrival: bool = False) -> _Entry:
        """The entry of ref's adapter, loading it if it is not there and there is room.
        pin: one more request needs it before its prefill (see release). arrival: a new
        request asks (counted as a hit or a miss; a waiting request asks again each step)."""
        key = self._key(ref)
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                e = self._entries[key] = _Entry(ref)
            else:
                self._entries.move_to_end(key)
            if arrival:
                if e.state in (State.READY, State.LOADING):
                    self.stats.hits += 1
                else:
                    self.stats.misses += 1
            if pin:
                e.pins += 1
            if e.state is State.WAITING and self._make_room(key):
                e.state = State.LOADING
                self._pool.submit(self._load, key, e)
            return e

    def release(self, ref: PedroRequest) -> None:
        """One request that pinned ref's adapter no longer needs it (prefilled or finished)."""
        with self._lock:
            e = self._entries.get(self._key(ref))
            if e is not None and e.pins > 0:
                e.pins -= 1
                if e.pins == 0 and e.state in (State.FAILED, State.WAITING):
                    del self._entries[self._key(ref)]  # a failure is retried by the next request

    def get(self, digest: str) -> AdapterWeights:
        e = self._entries[digest]
        assert e.state is State.READY, e.state
        return e.weights

    @property
    def num_resident(self) -> int:
        return sum(e.state in (State.READY, State.LOADING) for e in self._entries.values())

    @property
    def nbytes(self) -> int:
        return sum(e.weights.nbytes for e in list(self._entries.values()) if e.weights is not None)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- inside ---------------------------------------------------------------------------
    def _failed(self, cause: str) -> None:
        with self._lock:
            self.stats.failures += 1
            self.stats.failures_by_cause[cause] = self.stats.failures_by_cause.get(cause, 0) + 1

    @staticmethod
    def _key(ref: PedroRequest) -> str:
        if ref.digest is None:
            raise AdapterError(f"PEDRO adapter {ref.name!r} reached the engine unvalidated (no digest)")
        return ref.digest

    def _make_room(self, key: str) -> bool:
        """Whether one more adapter may be resident, evicting unpinned LRU entries. Lock held."""
        while self.num_resident >= self.capacity:
            victim = next((k for k, e in self._entries.items()
                           if k != key and e.pins == 0 and e.state is State.READY), None)
            if victim is None:
                return False
            del self._entries[victim]
            self.stats.evictions += 1
        return True

    def _load(self, key: str, entry: _Entry) -> None:
        t0 = time.perf_counter()
        ref = entry.ref
        try:
            files = read_adapter_files(ref.path)
            with self._lock:
                self.stats.disk_reads += 1
            changed = files.digest != ref.digest
            try:
                config, tensors = parse_adapter(files, self.base)
                check_servable(config, self.serving)
            except AdapterError as e:
                if changed:
                    raise AdapterChangedError(f"{e} (its files changed after it was validated)") from e
                raise
            if changed:
                raise AdapterChangedError(f"its files in {ref.path!r} changed after it was validated (now sha256 "
                                   f"{files.digest[:12]}..., validated {ref.digest[:12]}...); load it again to "
                                   "serve the new files")
            weights = AdapterWeights.build(config, key, tensors, self.dtype, self.pin)
            entry.weights, entry.state = weights, State.READY
        except (AdapterError, OSError) as e:
            entry.error, entry.state = str(e), State.FAILED
            self._failed(failure_cause(e))
        except Exception as e:  # noqa: BLE001  (a loader thread must never take the engine down)
            logger.exception("PEDRO: loading adapter %r failed", ref.name)
            entry.error, entry.state = f"internal error while loading: {type(e).__name__}: {e}", State.FAILED
            self._failed("internal")
        finally:
            elapsed = time.perf_counter() - t0
            with self._lock:
                self.stats.load_seconds += elapsed
                self.stats.load_hist.observe(elapsed)
        if entry.state is State.FAILED:
            logger.warning("PEDRO adapter %r (%r) failed to load: %s", ref.name, ref.path, entry.error)
