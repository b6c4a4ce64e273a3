"""Peak memory of this process, of every process it started (a local Ray instance: GCS, raylet, the
workers) and of the node, while a block runs, read from /proc (Linux).

Per process: the peak resident set (VmHWM, reset at the start with `clear_refs`, so a peak between two
samples still counts; a process gone before the next sample keeps its last sampled value). For the
process tree: the peak sum of proportional set sizes (PSS: a shared page, such as Ray's object store,
counted once over the processes mapping it), which is the memory the tree holds on the node. For the
node: the peak of MemTotal - MemAvailable, which includes everything else running on the machine.

Ray joined at an address (not started by this process) is outside the tree: only the driver is seen.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

import psutil

MB = 2**20


def _kb_lines(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    """The named `NAME: N kB` lines of a /proc file (status, meminfo, smaps_rollup) as bytes."""
    values = {}
    with open(path) as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in keys:
                values[name] = int(rest.split()[0]) * 1024
    return values


def node_used() -> int:
    """MemTotal - MemAvailable of the node, bytes."""
    info = _kb_lines("/proc/meminfo", ("MemTotal", "MemAvailable"))
    return info["MemTotal"] - info["MemAvailable"]


def _label(proc: psutil.Process) -> str:
    """What the process is: Ray sets its workers' titles (ray::IDLE, ray::MapWorker(...)); else the program."""
    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return "?"
    first = cmdline[0] if cmdline else proc.name()
    return first if first.startswith("ray::") else os.path.basename(first.split()[0]) if first else "?"


@dataclass
class ProcessPeak:
    pid: int
    label: str
    peak_rss: int = 0


@dataclass
class TreeMemory:
    """Context manager: sample the memory of this process tree and the node every `interval` seconds."""

    interval: float = 0.25
    processes: dict[int, ProcessPeak] = field(default_factory=dict)
    tree_pss_peak: int = 0
    node_used_start: int = 0
    node_used_peak: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._root = psutil.Process()

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return [self._root]

    def _reset_peaks(self) -> None:
        for proc in self._tree():
            try:
                with open(f"/proc/{proc.pid}/clear_refs", "w") as f:
                    f.write("5")  # 5: reset the peak resident set (VmHWM) to the current one
            except OSError:
                pass

    def sample(self) -> None:
        pss = 0
        for proc in self._tree():
            try:
                peak = _kb_lines(f"/proc/{proc.pid}/status", ("VmHWM",)).get("VmHWM", 0)
                pss += _kb_lines(f"/proc/{proc.pid}/smaps_rollup", ("Pss",)).get("Pss", 0)
            except OSError:  # gone since it was listed
                continue
            seen = self.processes.setdefault(proc.pid, ProcessPeak(proc.pid, _label(proc)))
            if peak > seen.peak_rss:
                seen.peak_rss, seen.label = peak, _label(proc)
        self.tree_pss_peak = max(self.tree_pss_peak, pss)
        self.node_used_peak = max(self.node_used_peak, node_used())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreeMemory:
        self._reset_peaks()
        self.node_used_start = self.node_used_peak = node_used()
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def summary(self, top: int = 5) -> dict[str, Any]:
        """Peaks in MB: the driver (this process), the largest other processes, the tree, the node."""
        driver = self.processes.get(self._root.pid)
        others = sorted((p for p in self.processes.values() if p.pid != self._root.pid),
                        key=lambda p: p.peak_rss, reverse=True)
        return {
            "driver_peak_rss_mb": round(driver.peak_rss / MB, 1) if driver else 0.0,
            "worker_peak_rss_mb": round(others[0].peak_rss / MB, 1) if others else 0.0,
            "largest_processes": [{"pid": p.pid, "label": p.label, "peak_rss_mb": round(p.peak_rss / MB, 1)}
                                  for p in others[:top]],
            "processes_seen": len(self.processes),
            "tree_pss_peak_mb": round(self.tree_pss_peak / MB, 1),
            "node_used_start_mb": round(self.node_used_start / MB, 1),
            "node_used_peak_mb": round(self.node_used_peak / MB, 1),
        }
