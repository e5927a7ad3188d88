"""``top``: a live full-screen view of the kernel and the machine, refreshed every second.

:func:`sample` reads the kernel (stats, devices, models, unfinished jobs) and the host
(psutil); :func:`gather` turns one sample, and the one before it for rates, into an
Output (pure: tested without a kernel or a terminal); :func:`run_top` shows it full screen
until ``q`` (or Ctrl-C, Esc).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import psutil

from llmos import Client
from llmos.contract.protocol import KernelError

from . import render, views
from .commands import Output, Table

REFRESH_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class TopSample:
    """One reading. ``at`` is ``time.monotonic()``; ``host`` holds ``cpu_percent``,
    ``memory_total``, ``memory_used`` (bytes) and ``load`` (1, 5, 15 minutes)."""

    at: float
    stats: dict[str, Any]
    devices: list[dict[str, Any]]
    models: list[dict[str, Any]]
    jobs: list[dict[str, Any]]
    host: dict[str, Any]


def sample(client: Client, cpu_interval: float | None = None) -> TopSample:
    """Read the kernel and the host. CPU use is since the previous call, or over
    ``cpu_interval`` seconds (blocking) when given: a first reading needs one."""
    memory = psutil.virtual_memory()
    host = {"cpu_percent": psutil.cpu_percent(interval=cpu_interval), "memory_total": memory.total,
            "memory_used": memory.total - memory.available, "load": list(os.getloadavg())}
    return TopSample(time.monotonic(), client.stats(), client.devices(), client.models(),
                     client.jobs(finished=False), host)


def _rate(now: float, before: float, seconds: float) -> float:
    return max(0.0, now - before) / seconds if seconds > 0 else 0.0


def gather(current: TopSample, previous: TopSample | None) -> Output:
    """The view of ``current``. Rates (finished jobs and requests per second) are over the
    time since ``previous``, or over the kernel's uptime when there is none."""
    stats = current.stats
    finished = sum(stats["finished"].values())
    if previous is None:
        seconds = stats["uptime"]
        jobs_rate, requests_rate = _rate(finished, 0, seconds), _rate(stats["received"], 0, seconds)
    else:
        seconds = current.at - previous.at
        jobs_rate = _rate(finished, sum(previous.stats["finished"].values()), seconds)
        requests_rate = _rate(stats["received"], previous.stats["received"], seconds)
    host = current.host
    active = stats["active"]
    summary = (
        f"llmos top - up {stats['uptime'] / 3600:.1f} h, kernel pid {stats['pid']} rss "
        f"{views.human_bytes(stats['rss'])} | host cpu {host['cpu_percent']:.0f}%, memory "
        f"{views.human_bytes(host['memory_used'])} / {views.human_bytes(host['memory_total'])}, "
        f"load {' '.join(f'{x:.2f}' for x in host['load'])}\n"
        f"jobs: {stats['queued']} queued, {active.get('RUNNING', 0)} running, {finished} finished "
        f"| throughput {jobs_rate:.2f} jobs/s, {requests_rate:.2f} requests/s | "
        f"rejected {stats['rejected']}, dropped replies {stats['dropped_replies']}   (q quits)")
    loaded = [m for m in current.models if m["loaded_on"]]
    tables = (
        Table("devices", ("DEVICE", "STATE", "INFLIGHT", "RSS", "LOADED", "RESTARTS"),
              tuple((d["name"], d["state"], d["inflight"], views.human_bytes(d["rss"]),
                     ", ".join(d["loaded"]) or "-", d["restarts"]) for d in current.devices)),
        Table("loaded models", ("MODEL", "SERVING", "DEVICES"),
              tuple((f"{m['model']}:{m['version']}", "*" if m["serving"] else "",
                     ", ".join(m["loaded_on"])) for m in loaded)),
        Table("queues", ("OWNER", "UNFINISHED JOBS"),
              tuple(sorted(stats["clients"].items()))),
        *views.jobs(current.jobs, title="unfinished jobs").tables,
    )
    data = {"host": host, "stats": stats, "devices": current.devices, "loaded": loaded,
            "jobs": current.jobs,
            "throughput": {"jobs_per_second": jobs_rate, "requests_per_second": requests_rate}}
    return Output(data=data, text=summary, tables=tables)


class _Screen:
    """The newest sample and the one before it; a failed read shows as an error line."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.previous: TopSample | None = None
        self.current: TopSample | None = None
        self.problem = ""

    def text(self, width: int) -> str:
        if self.current is None or time.monotonic() - self.current.at >= REFRESH_SECONDS:
            try:
                first = 0.1 if self.current is None else None
                self.previous, self.current = self.current, sample(self.client, first)
                self.problem = ""
            except KernelError as exc:
                self.problem = f"error {exc.code}: {exc.message}"
        if self.current is None:
            return self.problem
        shown = render.to_ansi(gather(self.current, self.previous), width)
        return f"{self.problem}\n{shown}" if self.problem else shown


def run_top(client: Client) -> None:
    """Full screen until q, Esc or Ctrl-C."""
    from prompt_toolkit.application import Application
    from prompt_toolkit.formatted_text import ANSI
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.layout import Layout, Window
    from prompt_toolkit.layout.controls import FormattedTextControl

    screen = _Screen(client)
    keys = KeyBindings()

    @keys.add("q")
    @keys.add("escape")
    @keys.add("c-c")
    def _quit(event: Any) -> None:
        event.app.exit()

    app: Application[None] = Application(
        layout=Layout(Window(FormattedTextControl(
            lambda: ANSI(screen.text(app.output.get_size().columns))))),
        key_bindings=keys, full_screen=True, refresh_interval=REFRESH_SECONDS)
    app.run()
