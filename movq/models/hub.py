"""The Hugging Face Hub side of model folders: repo ids resolved through the Hub cache, uploads, and the
model card (``README.md``) written beside the weights.

* A name that is a local path is always that path (see :func:`movq.models.pretrained.resolve_model_dir`);
  only a name of the form ``org/name`` that is *not* a local path is a repo id. It is fetched with
  ``huggingface_hub.snapshot_download`` into the Hub cache (``$HF_HUB_CACHE``, ``~/.cache/huggingface/hub``)
  and read from there: with ``HF_HUB_OFFLINE=1`` or ``local_files_only=True`` nothing leaves the machine
  and only the cache is read. Only the files of a model folder are fetched (``HUB_FILES``), also under a
  checkpoint's ``ema/`` and ``model/``, never optimizer state.
* The model card is the Hub's ``README.md``: YAML metadata (``library_name: movq``, tags) and a body with
  what the model is, how to load it, its ``config.json``, and where known the training data and the
  run's metrics (:func:`card_sections`). Trainers add the last two (:func:`write_checkpoint_cards`).
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from movq.utils import PathLike

log = logging.getLogger(__name__)

CARD_NAME = "README.md"
# What a model folder holds (pretrained.WEIGHTS_NAME, CONFIG_NAME, LEGACY_CONFIG_NAME, the prior's
# generation_config.json, the converter's conversion.json, the card), at the top or in a checkpoint's
# ema/ and model/.
_FOLDER_FILES = ("model.safetensors", "config.json", "config.yaml", "generation_config.json", "conversion.json",
                 CARD_NAME)
HUB_FILES = [f"{sub}{name}" for sub in ("", "ema/", "model/") for name in _FOLDER_FILES]
# huggingface_hub's repo id rule: namespace/name of letters, digits, '-', '_', '.', not starting with '.'
# or '-' and without '--' or '..'. One slash, so 'runs/tiny/checkpoints' is never taken for a repo.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def looks_like_repo_id(name: str) -> bool:
    """Whether ``name`` has the shape of a Hub repo id ``org/name`` (callers check local paths first)."""
    return bool(_REPO_ID.fullmatch(name)) and "--" not in name and ".." not in name and not name.endswith(".")


def download_model_folder(repo_id: str, *, revision: Optional[str] = None, subfolder: Optional[str] = None,
                          cache_dir: Optional[PathLike] = None, local_files_only: bool = False,
                          token: Optional[str] = None, force_download: bool = False) -> Path:
    """The local snapshot of a Hub repo's model files (downloaded into the Hub cache unless there already,
    or offline). Raises ``FileNotFoundError`` with one line saying why when it cannot be had."""
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        snapshot = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
            force_download=force_download, allow_patterns=[prefix + f for f in HUB_FILES], library_name="movq")
    except Exception as e:  # huggingface_hub: not found, gated, offline without a cached copy, bad revision, ...
        where = f"{repo_id}" + (f"@{revision}" if revision else "")
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FileNotFoundError(f"{where} is not a local folder, and as a Hugging Face repo id it could not be "
                                f"loaded ({type(e).__name__}: {first})") from None
    folder = Path(snapshot) / prefix if prefix else Path(snapshot)
    if not folder.is_dir():
        raise FileNotFoundError(f"{repo_id}: the repo has no folder {subfolder!r}")
    return folder


def upload_model_folder(folder: PathLike, repo_id: str, *, commit_message: str = "Upload model with movq",
                        private: Optional[bool] = None, token: Optional[str] = None, branch: Optional[str] = None,
                        create_pr: Optional[bool] = None, **upload_kwargs: Any) -> str:
    """Create the model repo ``repo_id`` if needed and upload every file of ``folder`` in one commit;
    returns the commit URL. Runs only when asked: ``save_pretrained(..., push_to_hub=True)`` or
    ``push_to_hub``."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
    info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                             commit_message=commit_message, revision=branch, create_pr=create_pr, **upload_kwargs)
    return str(getattr(info, "commit_url", info))


# --------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------
CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Use

```python
{{ usage }}
```

## Config

`config.json` holds the architecture (format {{ format_version }}); it is all `from_pretrained` needs:

```json
{{ config_json }}
```
{{ sections }}
Written by movq's `save_pretrained`.
"""


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v) or "—"
    return "—" if v is None or v == "" else str(v)


def card_sections(training: Optional[Mapping[str, Any]] = None, metrics: Optional[Mapping[str, Any]] = None,
                  source: Optional[Mapping[str, Any]] = None, notes: Optional[list[str]] = None) -> str:
    """The optional parts of a card body: ``training`` (the run: data and settings, as name → value),
    ``metrics`` (name → value, or name → {"value", "step"}), ``source`` (what a converted model came from)."""
    parts = []
    if source:
        parts.append("## Converted from\n\n" + "".join(f"* {k}: `{_value(v)}`\n" for k, v in source.items()))
    if training:
        data = training.get("data") or {}
        rest = {k: v for k, v in training.items() if k != "data"}
        lines = ["## Training data\n"]
        lines += [f"* `data.{k}`: `{_value(v)}`" for k, v in data.items() if v is not None] or ["* not recorded"]
        if rest:
            lines += ["", "## Training", ""] + [f"* {k}: `{_value(v)}`" for k, v in rest.items()]
        parts.append("\n".join(lines) + "\n")
    if metrics:
        rows = []
        for name, v in metrics.items():
            value, step = (v.get("value"), v.get("step")) if isinstance(v, Mapping) else (v, None)
            rows.append(f"| {name} | {_value(value)} | {_value(step)} |")
        head = "## Metrics\n\n" + (f"{notes[0]}\n\n" if notes else "")
        parts.append(head + "| metric | value | step |\n|---|---|---|\n" + "\n".join(rows) + "\n")
    return "\n" + "\n".join(parts) if parts else ""


def card_kwargs(title: str, summary: str, usage: str, config_record: Mapping[str, Any], **sections: Any) -> dict:
    """The template variables of :data:`CARD_TEMPLATE`."""
    return {"title": title, "summary": summary, "usage": usage, "format_version": config_record["format_version"],
            "config_json": json.dumps(config_record, indent=1), "sections": card_sections(**sections)}


# --------------------------------------------------------------------------------------
# Cards of a trainer's checkpoint
# --------------------------------------------------------------------------------------
def latest_metrics(metrics_file: PathLike, step: int, kinds: tuple[str, ...] = ("eval", "fid")) -> dict:
    """``{name: {"value", "step"}}``: the numbers of the newest record of each kind at or before ``step``
    in a run's ``metrics.jsonl`` (a torn line is skipped)."""
    newest: dict[str, dict] = {}
    path = Path(metrics_file)
    if not path.is_file():
        return {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or record.get("kind") not in kinds or record.get("step", step + 1) > step:
            continue
        if record["step"] >= newest.get(record["kind"], {}).get("step", -1):
            newest[record["kind"]] = record
    out = {}
    for record in newest.values():
        for k, v in record.items():
            if k not in ("step", "kind") and isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = {"value": v, "step": record["step"]}
    return out


def write_checkpoint_cards(checkpoint: PathLike, cfg: Any, run_root: PathLike, step: int, **training: Any) -> None:
    """Rewrite the model card of each model folder (``model/``, ``ema/``) of a checkpoint being written
    with the run's training data (``cfg.data``), settings and newest metrics (from ``metrics.jsonl``)."""
    from movq.config import to_dict
    from movq.models.pretrained import write_model_card

    checkpoint = Path(checkpoint)
    t = cfg.train
    info = {"data": to_dict(cfg.data), "run": str(run_root), "step": step, "max_steps": t.max_steps, "lr": t.lr,
            "batch size per process": cfg.data.batch_size, "grad_accum": t.grad_accum, **training}
    metrics = latest_metrics(Path(run_root) / "metrics.jsonl", step)
    has_ema = (checkpoint / "ema").is_dir()
    for sub in ("model", "ema"):
        if (checkpoint / sub).is_dir():
            note = ("Measured on the EMA weights (`ema/`) of this checkpoint." if has_ema
                    else "Measured on these weights.")
            write_model_card(checkpoint / sub, training=info, metrics=metrics, notes=[note])
