"""What the benchmark tools (tools/bench_kernels.py, bench_train.py, bench_sampling.py) record about
the machine they ran on, and how they write their JSON report (kept out of the library, like
tools/_train_cli.py)."""
from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Optional, Union

import torch

from movq.utils import atomic_write, output_problem

# Reported by every benchmark, besides python, torch and torch's CUDA build.
BASE_PACKAGES = ("triton",)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux; e.g. ``AMD EPYC 7763``), else what
    ``platform.processor()`` says, else the machine type (``x86_64``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def device_name(device: Union[torch.device, str]) -> str:
    """The GPU's name for a CUDA ``device``; for the CPU ``CPU (<model>, <machine>, <N> threads)``,
    N being torch's intra-op threads (what the timings ran with)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_model()}, {platform.machine()}, {torch.get_num_threads()} threads)"


def versions(*packages: str) -> dict[str, Optional[str]]:
    """``{"python", "torch", "cuda", "triton", *packages: version}``; ``cuda`` is the CUDA torch was
    built with and an absent package is None. ``packages`` are distribution names as they appear
    in the JSON (``vector_quantize_pytorch``; underscores and dashes are the same to pip)."""
    out: dict[str, Optional[str]] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in (*BASE_PACKAGES, *packages):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def check_out(parser, args) -> None:
    """``parser.error`` now, before the benchmark runs, when ``args.out`` cannot be written."""
    problem = output_problem(args.out) if args.out else None
    if problem:
        parser.error(f"--out: {problem}")


def write_report(report: dict, out: Union[str, Path], detail: str = "") -> Path:
    """Write ``report`` as indented JSON to ``out`` (parent folders made) and print ``wrote <out>``
    followed by ``detail``. Atomic (``movq.config.atomic_write``): an interrupted or failed
    write leaves the previous file as it was."""
    out = Path(out)
    text = json.dumps(report, indent=1) + "\n"  # before touching the disk: a non-JSON value raises here
    atomic_write(out, text)
    print(f"wrote {out}{detail}", flush=True)
    return out
