"""PEDRO on vLLM's /metrics: the host store, the device rows, the requests.

The numbers live in the engine core (the scheduler and the store's loader threads), the
/metrics page in the API server process. vLLM carries its own scheduler stats between
the two as a typed struct that has no room for a plugin's numbers, so the engine core
writes a small JSON snapshot of PEDRO's numbers to a file (at most every
SNAPSHOT_PERIOD_S, and only when they changed), and the front end's collector reads it
when Prometheus scrapes: `vllm:pedro_*` series in vLLM's own registry (and in
`LLM.get_metrics()` offline), with vLLM's `model_name` and `engine` labels. Counters are
cumulative in the engine, so a late scrape loses nothing.

Per-tenant series only with --pedro-metrics-tenant-labels N: the first N tenants seen get
their own `tenant` label, every other tenant is counted under "__other__", so thousands of
tenants cannot blow up the label set.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field

logger = logging.getLogger("vllm_pedro")

SNAPSHOT_PERIOD_S = 0.5
OTHER_TENANTS = "__other__"
# Adapter read + digest + validation + stacking, seconds (a few MB: milliseconds to seconds).
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FAILURE_CAUSES = ("missing", "changed", "invalid", "io", "internal")


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LOAD_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LOAD_BUCKETS) + 1))  # last: +Inf
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def to_dict(self) -> dict:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.total}


@dataclass
class TenantCounter:
    """Requests per tenant name, at most `cap` names with their own count."""

    cap: int
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str) -> None:
        if not self.cap:
            return
        if name not in self.counts and len(self.counts) - (OTHER_TENANTS in self.counts) >= self.cap:
            name = OTHER_TENANTS  # past the cap: one shared label
        self.counts[name] = self.counts.get(name, 0) + 1


def default_stats_path() -> str:
    """A file in a fresh private folder (removed when this process exits), for the engine
    core to write and the front end to read."""
    import atexit
    import shutil

    folder = tempfile.mkdtemp(prefix="vllm-pedro-metrics-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return os.path.join(folder, "stats.json")


class SnapshotWriter:
    """Writes `snapshot()` to `path` every SNAPSHOT_PERIOD_S when it changed (a daemon
    thread of the engine core; the write is atomic: a reader sees the old or the new file)."""

    def __init__(self, path: str, snapshot):
        self.path, self.snapshot = path, snapshot
        self._stop = threading.Event()
        self._last: dict | None = None
        self._thread = threading.Thread(target=self._run, name="pedro-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SNAPSHOT_PERIOD_S):
            self.write()

    def write(self) -> None:
        try:
            snap = self.snapshot()
            if snap == self._last:
                return
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(snap, f)
            os.replace(tmp, self.path)
            self._last = snap
        except Exception as e:  # noqa: BLE001  (metrics must never take the engine down)
            logger.debug("PEDRO metrics snapshot not written: %s", e)

    def close(self) -> None:
        self._stop.set()
        self.write()  # the final numbers


# -- the front end: a Prometheus collector over the snapshot ----------------------------------
GAUGES = {  # snapshot key -> (series, help)
    "store_adapters": ("vllm:pedro_store_adapters", "PEDRO adapters held validated in the host store."),
    "store_capacity": ("vllm:pedro_store_capacity", "Adapters the host store may hold (--max-cpu-pedro-adapters)."),
    "device_rows_used": ("vllm:pedro_device_rows_used", "Device adapter rows holding an adapter."),
    "device_rows": ("vllm:pedro_device_rows", "Device adapter rows (--max-pedro-adapters): distinct adapters "
                                              "one step can prefill."),
    "waiting_for_adapter": ("vllm:pedro_requests_waiting_for_adapter",
                            "PEDRO requests waiting for their adapter to be read and validated."),
    "running": ("vllm:pedro_requests_running", "Unfinished PEDRO requests in the engine."),
}
COUNTERS = {
    "store_hits": ("vllm:pedro_store_hits", "Adapter lookups answered from the host store."),
    "store_misses": ("vllm:pedro_store_misses", "Adapter lookups that needed a read from disk."),
    "disk_reads": ("vllm:pedro_adapter_disk_reads", "Adapters read from disk (each read is a full load)."),
    "evictions": ("vllm:pedro_store_evictions", "Adapters evicted from the host store (least recently used)."),
}


class PedroCollector:
    """Yields the `vllm:pedro_*` families from the engine's latest snapshot."""

    def __init__(self):
        self.path: str | None = None
        self.labels = {"model_name": "", "engine": "0"}

    def watch(self, path: str, model_name: str) -> None:
        self.path, self.labels = path, {"model_name": model_name, "engine": "0"}

    def read(self) -> dict | None:
        if not self.path:
            return None
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None  # not written yet (no PEDRO traffic), or the engine is gone

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        snap = self.read()
        if snap is None:
            return
        names, values = list(self.labels), list(self.labels.values())
        for key, (name, doc) in GAUGES.items():
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, snap.get(key, 0))
            yield g
        for key, (name, doc) in COUNTERS.items():
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(values, snap.get(key, 0))
            yield c
        c = CounterMetricFamily("vllm:pedro_adapter_load_failures", "Adapter loads that failed, by cause: missing "
                                "(files gone), changed (files differ from the validated ones), invalid (not an "
                                "adapter for this model), io, internal.", labels=names + ["cause"])
        for cause in FAILURE_CAUSES:
            c.add_metric(values + [cause], snap.get("failures", {}).get(cause, 0))
        yield c
        c = CounterMetricFamily("vllm:pedro_requests_finished", "Finished PEDRO requests by finish reason.",
                                labels=names + ["finished_reason"])
        for reason, n in sorted(snap.get("finished", {}).items()):
            c.add_metric(values + [reason], n)
        yield c
        hist = snap.get("load_seconds")
        if hist:
            h = HistogramMetricFamily("vllm:pedro_adapter_load_seconds", "Seconds a loader thread took to read, "
                                      "digest, validate and stack one adapter (off the model step).", labels=names)
            cumulative, buckets = 0, []
            for le, n in zip([*hist["buckets"], float("inf")], hist["counts"]):
                cumulative += n
                buckets.append(("+Inf" if le == float("inf") else repr(float(le)), cumulative))
            h.add_metric(values, buckets, hist["sum"])
            yield h
        tenants = snap.get("tenants")
        if tenants:
            c = CounterMetricFamily("vllm:pedro_tenant_requests", "PEDRO requests per tenant (the first "
                                    "--pedro-metrics-tenant-labels tenants; the rest under __other__).",
                                    labels=names + ["tenant"])
            for name, n in sorted(tenants.items()):
                c.add_metric(values + [name], n)
            yield c


_collector: PedroCollector | None = None


def watch_engine(path: str | None, model_name: str) -> PedroCollector | None:
    """Serve this process's engine's PEDRO numbers from vLLM's Prometheus registry (one
    collector per process: a newer engine takes the place of an older one)."""
    global _collector
    if not path:
        return None
    if _collector is None:
        from prometheus_client import REGISTRY

        _collector = PedroCollector()
        REGISTRY.register(_collector)
    _collector.watch(path, model_name)
    return _collector
