"""What every benchmark shares: arguments, machine record, peak-memory probe, child runs, RESULTS.md.

A benchmark prints a rich table and rewrites only its own section of benchmarks/RESULTS.md
(between `<!-- BEGIN name -->` and `<!-- END name -->`), so the file is never typed by hand and
each section says which machine and which command produced it. Headlines are ratios against a
baseline measured in the same run; absolute times are kept for reference only.

Memory is measured, never computed from shapes: each measurement runs in a fresh Python
process (`run_child`), which records its resident set after loading its inputs, resets the
kernel's peak-RSS mark (/proc/self/clear_refs, value 5) and reads the peak (VmHWM) after the
work. The difference is the peak memory the work itself needed above its inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
REPO = RESULTS.parent.parent
RESULT_MARK = "BENCHMARK-RESULT "
console = Console(width=None if sys.stdout.isatty() else 180)

HEADER = """# Benchmark results

Every section below is written by its script (`python -m benchmarks.<name>`); do not edit by
hand, rerun the command shown in the section instead. Headline numbers are ratios against a
baseline measured in the same run on the same machine; absolute times are for reference.
"""


# --- arguments and machine ------------------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="Where models run")
    p.add_argument("--quick", action="store_true", help="Smallest sizes (a smoke run); results are not written")
    p.add_argument("--no-write", action="store_true", help="Print only; leave RESULTS.md as it is")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
    return p


def command_line(module: str) -> str:
    args = [a for a in sys.argv[1:]]
    return " ".join(["python", "-m", module, *map(shlex.quote, args)])


def machine_info(device: str) -> dict[str, Any]:
    import faiss
    import pytorch_metric_learning
    import timm
    import torch
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    info = {
        "cpu": cpu,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "memory GiB": round(mem_gib, 1),
        "load average (1 min)": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "pytorch-metric-learning": pytorch_metric_learning.__version__,
        "faiss": faiss.__version__,
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --- memory probe (runs inside a child process) ----------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Peak resident-set growth of this process over a block of work (Linux).

    `start()` notes the current RSS and resets the peak mark; `stop()` returns the peak above
    that start in bytes. Where the peak mark cannot be reset, ru_maxrss is used, which is only
    right when the block is the process's largest use so far (a child doing one job).
    """

    def __init__(self) -> None:
        self.base = 0
        self.resettable = False

    def start(self) -> None:
        import gc

        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        self.base = _status_kib("VmRSS") * 1024

    def current(self) -> int:
        """RSS now, above the start (bytes)."""
        return _status_kib("VmRSS") * 1024 - self.base

    def stop(self) -> int:
        if self.resettable:
            peak = _status_kib("VmHWM") * 1024
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(peak - self.base, 0)


# --- child processes -------------------------------------------------------------------------------


def run_child(module: str, spec: dict[str, Any], *, env: dict[str, str] | None = None, timeout: float = 3600) -> dict[str, Any]:
    """Run `python -m module --child JSON` in a fresh process and return the dict it reported."""
    cmd = [sys.executable, "-m", module, "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    raise RuntimeError(f"child {module} {spec} failed (exit {proc.returncode}):\n{tail}")


def report_child(result: dict[str, Any]) -> None:
    """The child's side of run_child: one marked JSON line on stdout."""
    print(RESULT_MARK + json.dumps(result), flush=True)


class Stopwatch:
    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


# --- tables and RESULTS.md -------------------------------------------------------------------------


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*(str(v) for v in r))
    console.print(table)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def esc(v: Any) -> str:
        return str(v).replace("|", "\\|")  # a bare | would end the cell

    align = ["---"] + ["---:"] * (len(columns) - 1)
    lines = ["| " + " | ".join(map(esc, columns)) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def machine_markdown(info: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in info.items())


def report(args: argparse.Namespace, module: str, name: str, title: str, headlines: Sequence[str], body: str, *,
           info: dict[str, Any], started: float) -> None:
    """Print the headlines; unless --quick or --no-write, rewrite the section with them above the body."""
    for h in headlines:
        console.print(h)
    if args.quick or args.no_write:
        return
    text = "Headline:\n\n" + "\n".join(f"- {h}" for h in headlines) + "\n\n" + body
    write_section(name, title, text, command=command_line(module), info=info, seconds=time.monotonic() - started)


def write_section(name: str, title: str, body: str, *, command: str, info: dict[str, Any], seconds: float) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = (
        f"<!-- BEGIN {name} -->\n## {title}\n\n"
        f"Command: `{command}`  \n"
        f"Run: {when}, {seconds:.0f} s.  \n"
        f"Machine: {machine_markdown(info)}.\n\n"
        f"{body.strip()}\n"
        f"<!-- END {name} -->\n"
    )
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else HEADER
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text, encoding="utf-8")
    console.print(f"[green]wrote section {name!r} of {RESULTS}[/]")


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f}"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.0f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def child_entry(args: argparse.Namespace, fn: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """If this process is a child, run its one measurement, report it and return True."""
    if not args.child:
        return False
    report_child(fn(json.loads(args.child)))
    return True
