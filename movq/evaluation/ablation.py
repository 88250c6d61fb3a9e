"""A seeded ablation grid of tokenizer variants at an equal budget (MoVQ, Zheng et al. 2022, Table 4).

MoVQ's claim is that its two parts each make reconstructions better at the same cost: the decoder's
spatially conditional normalization (``model.norm=spatial`` vs the VQGAN's GroupNorm) and the
multichannel quantization (``C`` channels of width ``d`` sharing one codebook vs one channel of width
``C·d``). This module is the grid's bookkeeping, apart from the training (``tools/ablate.py`` runs each
cell with ``movq.training.tokenizer.TokenizerTrainer``):

* variant names ``<norm>-<channels>[+<option>...]``: norm ``group`` | ``spatial``, channels ``single``
  (1 × C·d) | ``multi`` (C × d) of the base config's C and d, options from ``OPTIONS``;
* the overrides of one (variant, seed) cell: only the variant's keys and ``train.seed`` differ between
  cells, so steps, batch, data (its order and crops: ``data.seed`` is the base config's) and the
  evaluation are equal;
* the held-out evaluation of a trained model (``evaluate_tokenizer``);
* mean ± sample std over seeds, paired per-seed differences, and the Markdown table.
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from movq.config import TokenizerConfig, to_dict
from movq.data.stream import build_dataloader
from movq.evaluation.metrics import TokenizerMetrics

NORMS = {"group": "GroupNorm", "spatial": "SpatialNorm"}
CHANNELS = ("single", "multi")
# Options a variant may add, each a set of config overrides (applied after the norm / channel keys).
OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "init-identity": ("SpatialNorm starts as scale 1, shift 0", ("model.spatial_norm_init=identity",)),
    "init-default": ("SpatialNorm's conv_y / conv_b with PyTorch's default init", ("model.spatial_norm_init=default",)),
    "zq-post": ("zq taken after post_quant_conv", ("model.spatial_norm_zq=post_quant",)),
    "zq-conv": ("a 3×3 conv_zq on zq (MoVQGAN's add_conv)", ("model.spatial_norm_conv=true",)),
}
DEFAULT_VARIANTS = ("group-single", "group-multi", "spatial-single", "spatial-multi")
# The metrics of a cell and of the table: key, column title, decimals, higher is better.
METRICS = (
    ("psnr", "PSNR (dB)", 2, True),
    ("ssim", "SSIM", 3, True),
    ("lpips", "LPIPS", 3, False),
    ("val_usage", "usage, held-out", 3, True),
    ("train_usage", "usage, training window", 3, True),
    ("perplexity", "perplexity", 1, True),
    ("images_per_s", "train img/s", 1, True),
    ("peak_memory_mib", "peak MiB", 0, False),
)


@dataclass(frozen=True)
class Variant:
    """One row of the grid: its name, a readable label and the config overrides that make it."""

    name: str
    label: str
    overrides: tuple[str, ...]


def parse_variant(name: str, channels: int, dim: int) -> Variant:
    """``"spatial-multi+init-identity"`` → Variant, with the base config's ``channels`` C and ``dim`` d."""
    head, *options = name.split("+")
    norm, _, chan = head.partition("-")
    if norm not in NORMS or chan not in CHANNELS:
        raise ValueError(f"variant {name!r}: expected <norm>-<channels>[+option...] with norm in {sorted(NORMS)}, "
                         f"channels in {list(CHANNELS)}, options in {sorted(OPTIONS)}")
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise ValueError(f"variant {name!r}: unknown option(s) {unknown}; known: {sorted(OPTIONS)}")
    if options and norm != "spatial":
        raise ValueError(f"variant {name!r}: the options {options} change SpatialNorm; use them with 'spatial-'")
    width = channels * dim
    c, d = (1, width) if chan == "single" else (channels, dim)
    overrides = [f"model.norm={norm}", f"quantizer.channels={c}", f"quantizer.dim={d}"]
    label = f"{NORMS[norm]}, {c} × {d}"
    for o in options:
        overrides += OPTIONS[o][1]
        label += f", {OPTIONS[o][0]}"
    return Variant(name, label, tuple(overrides))


def budget(cfg: TokenizerConfig) -> dict:
    """What every cell of a grid shares: the training budget and the data it is spent on."""
    d, t = cfg.data, cfg.train
    return {"max_steps": t.max_steps, "batch_size": d.batch_size, "grad_accum": t.grad_accum,
            "image_size": d.image_size, "data_source": d.source, "data_train": d.train, "data_val": d.val,
            "data_seed": d.seed, "builtin_train_size": d.builtin_train_size,
            "builtin_val_size": d.builtin_val_size, "lr": t.lr, "gan_steps": max(0, t.max_steps - cfg.loss.disc_start)
            if cfg.loss.disc_factor > 0 else 0}


def cell_overrides(variant: Variant, seed: int, run_dir: str) -> list[str]:
    """Overrides of one cell on top of the base config and the grid's own overrides."""
    return [*variant.overrides, f"train.seed={seed}", f"train.run_dir={run_dir}", "train.resume=latest",
            "train.trackers=[]", "train.fid_every=0"]


def config_key(cfg: TokenizerConfig) -> str:
    """A hash of a cell's resolved config without where it runs: equal keys, equal experiment."""
    d = to_dict(cfg)
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("run_dir", "resume")}
    d["data"] = {k: v for k, v in d["data"].items() if k not in ("num_workers", "cache_dir")}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def evaluate_tokenizer(model: torch.nn.Module, cfg: TokenizerConfig, device: torch.device,
                       lpips: Optional[Callable] = None) -> dict:
    """PSNR / SSIM / LPIPS (with ``lpips``) / codebook usage / perplexity of ``model`` on the held-out
    split ``cfg.data`` names (one process); returns ``TokenizerMetrics.compute()`` plus the code
    counts."""
    was_training = model.training
    model.eval()
    try:
        metrics = TokenizerMetrics(cfg.quantizer.codebook_size, lpips=lpips, device=device)
        for batch in build_dataloader(cfg.data, "val"):
            x = batch["image"].to(device)
            x_rec, enc = model(x)
            metrics.update(x, x_rec.float().clamp(-1, 1), enc.indices)
        out = metrics.compute()
        out["code_counts"] = metrics.state["code_counts"].cpu()
        return out
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------- aggregation
def _finite(values: Iterable) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_std(values: Sequence) -> dict:
    """``{"mean", "std", "n", "values"}``: sample std (n − 1); None for std below two values."""
    vals = _finite(values)
    return {"mean": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals), "values": vals}


def aggregate(cells: Sequence[dict], variants: Sequence[str]) -> dict:
    """Per variant and metric, mean ± std over its finished seeds (``cells``: cell results)."""
    out = {}
    for v in variants:
        mine = sorted((c for c in cells if c["variant"] == v), key=lambda c: c["seed"])
        out[v] = {"seeds": [c["seed"] for c in mine],
                  **{k: mean_std([c["metrics"].get(k) for c in mine]) for k, *_ in METRICS}}
    return out


def default_comparisons(variants: Sequence[str]) -> list[tuple[str, str, str]]:
    """(title, a, b) pairs to report as a − b: MoVQ vs its VQGAN twin, each part on its own, and
    every variant with options against the same variant without them."""
    pairs = [
        ("full MoVQ vs VQGAN twin", "spatial-multi", "group-single"),
        ("SpatialNorm vs GroupNorm, 1 channel", "spatial-single", "group-single"),
        ("SpatialNorm vs GroupNorm, C channels", "spatial-multi", "group-multi"),
        ("C channels vs 1, GroupNorm", "group-multi", "group-single"),
        ("C channels vs 1, SpatialNorm", "spatial-multi", "spatial-single"),
    ]
    out = [p for p in pairs if p[1] in variants and p[2] in variants]
    for v in variants:
        base = v.split("+")[0]
        if "+" in v:
            if base in variants:
                out.append((f"{v} vs {base}", v, base))
            twin = "group-" + base.split("-")[1]
            if twin in variants:
                out.append((f"{v} vs {twin}", v, twin))
    return out


def paired(cells: Sequence[dict], a: str, b: str, metric: str = "psnr") -> dict:
    """Per-seed differences ``a − b`` of ``metric`` over the seeds both finished: mean ± std and wins."""
    by = {(c["variant"], c["seed"]): c["metrics"].get(metric) for c in cells}
    seeds = sorted(s for (v, s) in by if v == a and (b, s) in by)
    diffs = [by[(a, s)] - by[(b, s)] for s in seeds if by[(a, s)] is not None and by[(b, s)] is not None]
    return {"a": a, "b": b, "metric": metric, "seeds": seeds, **mean_std(diffs),
            "wins": sum(d > 0 for d in diffs)}


def usage_curve(cells: Sequence[dict], variant: str, points: int = 6) -> list[tuple[int, dict]]:
    """Training-window codebook usage of ``variant`` at up to ``points`` evenly spaced steps that all
    its seeds logged, the last one included: ``[(step, mean_std)]`` (what shows a collapse)."""
    curves = [{r["step"]: r["usage"] for r in c.get("usage_curve", []) if r.get("usage") is not None}
              for c in cells if c["variant"] == variant]
    if not curves:
        return []
    common = sorted(set.intersection(*(set(c) for c in curves)))
    n = len(common)
    k = min(points, n)
    steps = sorted({common[n - 1 - (i * n) // k] for i in range(k)})
    return [(s, mean_std([c[s] for c in curves])) for s in steps]


def _fmt(stat: dict, decimals: int) -> str:
    if stat["mean"] is None:
        return "–"
    s = f"{stat['mean']:.{decimals}f}"
    return s + (f" ± {stat['std']:.{decimals}f}" if stat["std"] is not None else "")


def render_markdown(report: dict) -> str:
    """The report's table (mean ± std over seeds) and paired differences, as Markdown."""
    b, agg = report["budget"], report["aggregate"]
    shown = [m for m in METRICS if any(agg[v][m[0]]["n"] for v in agg)]
    lines = [
        f"# {report['title']}",
        "",
        f"{b['max_steps']} steps × batch {b['batch_size']}"
        + (f" × {b['grad_accum']} accumulated" if b["grad_accum"] > 1 else "")
        + f" at {b['image_size']}², data `{b['data_source']}` (data seed {b['data_seed']}), lr {b['lr']:g}, "
        + ("GAN off; " if not b["gan_steps"] else f"GAN on for the last {b['gan_steps']} steps; ")
        + f"seeds {report['seeds']} (train.seed: initial weights and training randomness). "
        f"Held-out split, EMA weights. Mean ± sample std over seeds. Device: {report['device']}.",
        "",
        "| variant | " + " | ".join(m[1] for m in shown) + " | seeds |",
        "|---|" + "---|" * len(shown) + "---|",
    ]
    for v, stats in agg.items():
        lines.append(f"| `{v}` ({report['labels'][v]}) | " + " | ".join(_fmt(stats[m[0]], m[2]) for m in shown)
                     + f" | {len(stats['seeds'])} |")
    if report.get("comparisons"):
        lines += ["", "Paired per-seed PSNR differences (dB, a − b):", "",
                  "| comparison | a − b | wins |", "|---|---|---|"]
        for c in report["comparisons"]:
            lines.append(f"| {c['title']} (`{c['a']}` − `{c['b']}`) | {_fmt(c, 2)} | {c['wins']}/{c['n']} |")
    curves = {v: usage_curve(report.get("cells", []), v) for v in agg}
    steps = sorted({s for c in curves.values() for s, _ in c})
    if steps:
        lines += ["", "Codebook usage during training (fraction of codes chosen in the last `quantizer.usage_window` "
                  "steps; mean over seeds; a collapse shows as a falling row):", "",
                  "| variant | " + " | ".join(f"step {s}" for s in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        for v, c in curves.items():
            if c:
                at = dict(c)
                lines.append(f"| `{v}` | " + " | ".join(_fmt({**at[s], "std": None}, 3) if s in at else "–"
                                                         for s in steps) + " |")
    if report.get("notes"):
        lines += ["", *report["notes"]]
    if report.get("command"):
        lines += ["", "Reproduce:", "", "```bash", report["command"], "```"]
    return "\n".join(lines) + "\n"
