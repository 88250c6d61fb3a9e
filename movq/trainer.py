"""The tokenizer's training loop (VQGAN schedule of Esser et al. 2021 on Accelerate).

One optimizer step is ``train.grad_accum`` micro-batches of: a generator pass (reconstruction,
LPIPS, quantizer and, from ``disc_start`` on, the adaptive-weighted GAN term) and a discriminator
pass (hinge loss on real and reconstructed images). The loop owns both optimizers and the GAN
schedule; the model and the loss are separate modules (``movq.autoencoder``, ``movq.losses``).

Guarantees (issue 3): every rank reads its own data; only rank 0 writes; checkpoints are atomic and
a resume is bit-exact on CPU (the data stream is a pure function of seed and position, RNG states are
restored); a non-finite loss or gradient skips the step; SIGINT / SIGTERM save and exit.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from movq.autoencoder import MoVQ
from movq.config import TokenizerConfig
from movq.data import build_dataloader, train_batches
from movq.discriminator import PatchDiscriminator
from movq.losses import TokenizerLoss
from movq.metrics import TokenizerMetrics
from movq.training import (
    EMA,
    Checkpointer,
    RunDir,
    StepGuard,
    StopFlag,
    load_state_dict,
    mean_logs,
    save_state_dict,
    warmup_lambda,
    write_trainer_state,
)
from movq.visualize import save_grid, save_usage_chart

log = logging.getLogger(__name__)

GRID_IMAGES = 8  # columns of the reconstruction grid


def make_accelerator(train_cfg, project_dir: str) -> Accelerator:
    """CPU runs need ``cpu=True`` explicitly, or ranks under torchrun would not synchronise."""
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=train_cfg.mixed_precision,
        gradient_accumulation_steps=train_cfg.grad_accum,
        log_with=list(train_cfg.trackers) or None,
        project_dir=project_dir,
    )


class TokenizerTrainer:
    """Builds everything from a ``TokenizerConfig``; ``fit()`` trains to ``train.max_steps``."""

    def __init__(self, cfg: TokenizerConfig, accelerator: Optional[Accelerator] = None):
        self.cfg = cfg
        t = cfg.train
        if t.grad_accum < 1 or t.max_steps < 0:
            raise ValueError("train.grad_accum must be ≥ 1 and train.max_steps ≥ 0")
        self.acc = acc = accelerator or make_accelerator(t, t.run_dir)
        self.run = RunDir(t.run_dir, acc.is_main_process)
        self.run.save_config(cfg)

        set_seed(t.seed)  # identical initial weights on every rank
        model = MoVQ(cfg)
        disc = PatchDiscriminator(cfg.discriminator)
        self.loss_fn = TokenizerLoss(cfg.loss).to(acc.device)
        self.ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None
        if self.ema is not None:
            self.ema.model.to(acc.device)

        params_g = [p for p in model.parameters() if p.requires_grad]
        opt_g = torch.optim.Adam(params_g, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        opt_d = torch.optim.Adam(disc.parameters(), lr=t.disc_lr or t.lr, betas=t.betas, weight_decay=t.weight_decay)
        sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, warmup_lambda(t.warmup_steps))
        sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, warmup_lambda(t.warmup_steps))
        (self.model, self.disc, self.opt_g, self.opt_d, self.sched_g, self.sched_d) = acc.prepare(
            model, disc, opt_g, opt_d, sched_g, sched_d
        )
        # Per-rank runtime randomness (DiT): seed · world_size + rank.
        set_seed(t.seed * acc.num_processes + acc.process_index)

        self.guard = StepGuard(t.max_bad_steps)
        self.checkpointer = Checkpointer(acc, self.run.checkpoints, t.keep_checkpoints)
        self.fid = None
        if t.fid_every > 0:
            from movq.fid import FIDTracker

            # rFID against the held-out originals; their statistics are cached in the run folder.
            ref = t.fid_reference or str(self.run.root / "fid_reference.npz")
            self.fid = FIDTracker(t.inception_weights, ref, device=acc.device)
        self.step = 0
        self.skipped: dict[str, int] = {}
        self.images_seen = 0
        if t.trackers:
            from movq.config import to_dict

            flat = {f"{s}.{k}": v for s, sec in to_dict(cfg).items() for k, v in sec.items()}
            acc.init_trackers(t.project, config={k: str(v) if isinstance(v, (list, dict)) else v for k, v in flat.items()})

    # ------------------------------------------------------------------ checkpoints
    def _write_extra(self, folder: Path) -> None:
        unwrapped = self.acc.unwrap_model(self.model)
        unwrapped.save_pretrained(folder / "model")
        if self.ema is not None:
            self.ema.model.save_pretrained(folder / "ema")
        save_state_dict(self.acc.unwrap_model(self.disc), folder / "discriminator.safetensors")
        write_trainer_state(
            folder,
            {"step": self.step, "guard": self.guard.state_dict(), "skipped": self.skipped, "images_seen": self.images_seen},
        )

    def save(self) -> Path:
        path = self.checkpointer.save(self.step, self._write_extra)
        self.acc.print(f"saved checkpoint {path}")
        return path

    def resume(self) -> None:
        path = self.checkpointer.resolve(self.cfg.train.resume)
        if path is None:
            if self.cfg.train.resume and self.cfg.train.resume != "latest":
                raise FileNotFoundError(f"no checkpoint at {self.cfg.train.resume}")
            return
        state = self.checkpointer.load(path)
        if self.ema is not None:
            load_state_dict(self.ema.model, path / "ema" / "model.safetensors")
        self.step = int(state["step"])
        self.guard.load_state_dict(state["guard"])
        self.skipped = {k: int(v) for k, v in state.get("skipped", {}).items()}
        self.images_seen = int(state.get("images_seen", 0))
        self.acc.print(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ one optimizer step
    def _micro_step(self, x: torch.Tensor) -> dict:
        acc, step = self.acc, self.step
        model = self.model
        gan = self.loss_fn.gan_active(step)
        last_layer = acc.unwrap_model(model).get_last_layer()
        with acc.accumulate(model, self.disc):
            with acc.autocast():
                x_rec, enc = model(x)
            logits_fake = None
            if gan:
                # The generator's GAN term goes through the bare discriminator with frozen weights:
                # no gradient lands on D, and D's DDP reducer is not involved in this backward.
                disc = acc.unwrap_model(self.disc).requires_grad_(False)
                with acc.autocast():
                    logits_fake = disc(x_rec)
                disc.requires_grad_(True)
            g_loss, logs = self.loss_fn.generator_loss(x, x_rec, enc.quant.loss, step, logits_fake, last_layer)
            acc.backward(g_loss)
            logs.update(perplexity=enc.quant.perplexity, usage=enc.quant.usage,
                        codebook_loss=enc.quant.codebook_loss, commitment_loss=enc.quant.commitment_loss)
            if gan:
                # One discriminator call on real and fake together (DDP-friendly; BatchNorm sees both).
                with acc.autocast():
                    logits = self.disc(torch.cat([x, x_rec.detach()]))
                real, fake = logits.chunk(2)
                d_loss, d_logs = self.loss_fn.discriminator_loss(real, fake, step)
                acc.backward(d_loss)
                logs.update(d_logs)
                logs["d_total"] = d_loss.detach()
        return logs

    def _optimizer_step(self, logs: dict) -> bool:
        """Clip, check finiteness, step both optimizers; False (and no update) if non-finite."""
        acc, t = self.acc, self.cfg.train
        max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
        gan = "d_total" in logs
        norm_g = acc.clip_grad_norm_(self.model.parameters(), max_norm)
        norm_d = acc.clip_grad_norm_(self.disc.parameters(), max_norm) if gan else None
        ok = self.guard.check(logs["loss"], norm_g, logs.get("d_total"), norm_d)
        if ok:
            self.opt_g.step()
            self.sched_g.step()
            if gan:
                self.opt_d.step()
                self.sched_d.step()
            if self.ema is not None:
                self.ema.update(acc.unwrap_model(self.model))
        else:
            acc.print(f"step {self.step}: non-finite loss or gradient, step skipped ({self.guard.in_a_row} in a row)")
        self.opt_g.zero_grad(set_to_none=True)
        self.opt_d.zero_grad(set_to_none=True)
        logs["grad_norm"] = norm_g
        if norm_d is not None:
            logs["d_grad_norm"] = norm_d
        return ok

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """PSNR / SSIM / LPIPS / usage / perplexity of the EMA (or live) model on the held-out split."""
        acc = self.acc
        model = self.ema.model if self.ema is not None else acc.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        metrics = TokenizerMetrics(self.cfg.quantizer.codebook_size, lpips=self.loss_fn.lpips, device=acc.device)
        loader = build_dataloader(self.cfg.data, "val", rank=acc.process_index, world_size=acc.num_processes)
        first = None
        for batch in loader:
            x = batch["image"].to(acc.device)
            with acc.autocast():
                x_rec, enc = model(x)
            x_rec = x_rec.float().clamp(-1, 1)
            metrics.update(x, x_rec, enc.indices)
            if first is None:
                first = (x[:GRID_IMAGES].cpu(), x_rec[:GRID_IMAGES].cpu())
        metrics.all_reduce_()
        results = metrics.compute()
        if acc.is_main_process:
            if first is not None:
                save_grid(first, self.run.images / f"recon_{self.step:07d}.png")
            save_usage_chart(metrics.state["code_counts"], self.run.images / f"usage_{self.step:07d}.png")
        model.train(was_training)
        return {f"val/{k}": v for k, v in results.items() if v is not None}

    @torch.no_grad()
    def compute_fid(self) -> Optional[float]:
        """rFID of the EMA (or live) model on the first ``train.fid_num_images`` held-out images
        (split over ranks), or None when the Inception weights are absent (logged once)."""
        if self.fid is None or self.fid.extractor() is None:
            return None
        acc = self.acc
        model = self.ema.model if self.ema is not None else acc.unwrap_model(self.model)
        limit = max(1, self.cfg.train.fid_num_images // acc.num_processes)

        def originals():
            seen = 0
            for batch in build_dataloader(self.cfg.data, "val", rank=acc.process_index, world_size=acc.num_processes):
                x = batch["image"][: limit - seen].to(acc.device)
                seen += x.shape[0]
                yield x
                if seen >= limit:
                    break

        def reconstructions():
            for x in originals():
                with acc.autocast():
                    x_rec = model(x)[0]
                yield x_rec.float().clamp(-1, 1)

        was_training = model.training
        model.eval()
        self.fid.ensure_reference(originals())  # computed once, then read from the cache file
        value = self.fid.compute(reconstructions())
        model.train(was_training)
        return value

    # ------------------------------------------------------------------ the loop
    def _log(self, history: list[dict], t0: float, images: int) -> dict:
        acc = self.acc
        means = mean_logs(history)
        keys = sorted(means)
        vec = torch.tensor([means[k] for k in keys], device=acc.device, dtype=torch.float64)
        vec = acc.reduce(vec, reduction="mean")
        out = {k: float(v) for k, v in zip(keys, vec.tolist())}
        for k, v in self._skipped_all_ranks().items():
            out[f"data_skipped/{k}"] = v
        out["lr"] = self.sched_g.get_last_lr()[0]
        out["bad_steps"] = self.guard.total
        out["images_per_s"] = images * acc.num_processes / max(time.time() - t0, 1e-9)
        self.run.log_metrics(self.step, "train", out)
        acc.log(out, step=self.step)
        return out

    def _skipped_all_ranks(self) -> dict:
        """Skip counts summed over ranks (reasons may differ between ranks)."""
        total: dict[str, int] = {}
        for part in gather_object([self.skipped]):
            for k, v in part.items():
                total[k] = total.get(k, 0) + v
        return total

    def fit(self) -> dict:
        """Train to ``train.max_steps``; returns a summary (steps, time, last eval metrics, paths)."""
        acc, t = self.acc, self.cfg.train
        self.resume()
        # The stream is a pure function of (seed, position): a resume continues where it stopped.
        batches = train_batches(self.cfg.data, rank=acc.process_index, world_size=acc.num_processes,
                                start_step=self.step * t.grad_accum)
        stop = StopFlag()
        history: list[dict] = []
        last_eval: dict = {}
        t_start = t_log = time.time()
        images_since_log = 0
        progress = None
        if acc.is_main_process:
            from tqdm.auto import tqdm

            progress = tqdm(total=t.max_steps, initial=self.step, unit="step", dynamic_ncols=True)
        self.model.train()
        self.disc.train()
        try:
            while self.step < t.max_steps:
                micro_logs = {}
                for _ in range(t.grad_accum):
                    batch = next(batches)
                    for reason, n in batch.get("skipped", {}).items():
                        self.skipped[reason] = self.skipped.get(reason, 0) + int(n)
                    x = batch["image"].to(acc.device, non_blocking=True)
                    micro_logs = self._micro_step(x)
                    images_since_log += x.shape[0]
                    self.images_seen += x.shape[0] * acc.num_processes
                if self._optimizer_step(micro_logs):
                    history.append({k: float(v) for k, v in micro_logs.items()})
                self.step += 1
                if progress is not None:
                    progress.update(1)
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    out = self._log(history or [{}], t_log, images_since_log)
                    if progress is not None:
                        progress.set_postfix(loss=f"{out.get('loss', math.nan):.4f}", img_s=f"{out['images_per_s']:.1f}")
                    history, t_log, images_since_log = [], time.time(), 0
                if self.step % t.eval_every == 0 or self.step == t.max_steps:
                    last_eval = self.evaluate()
                    self.run.log_metrics(self.step, "eval", last_eval)
                    acc.log(last_eval, step=self.step)
                if t.fid_every > 0 and self.step % t.fid_every == 0:
                    fid = self.compute_fid()
                    if fid is not None:
                        last_eval["val/rfid"] = fid
                        self.run.log_metrics(self.step, "fid", {"val/rfid": fid})
                        acc.log({"val/rfid": fid}, step=self.step)
                if self.step % t.save_every == 0 or self.step == t.max_steps:
                    self.save()
                if stop.should_stop(acc.device):
                    acc.print(f"stopping at step {self.step} on request")
                    if self.step % t.save_every != 0 and self.step != t.max_steps:
                        self.save()
                    break
            ckpts = self.checkpointer.list()
            summary = {
                "steps": self.step,
                "seconds": time.time() - t_start,
                "eval": last_eval,
                "bad_steps": self.guard.total,
                "data_skipped": self._skipped_all_ranks(),
                "run_dir": str(self.run.root),
                "checkpoint": str(ckpts[-1]) if ckpts else None,
            }
        finally:
            stop.restore()
            if progress is not None:
                progress.close()
            acc.end_training()  # closes trackers (and the process group)
        return summary
