"""The tokenizer's trainer (VQGAN schedule of Esser et al. 2021 on Accelerate).

One optimizer step (:meth:`TokenizerTrainer.train_step`) is ``train.grad_accum`` micro-batches of: a
generator pass (reconstruction, LPIPS, quantizer and, from ``disc_start`` on, the adaptive-weighted GAN
term) and a discriminator pass (hinge loss on real and reconstructed images); then both updates. The
model and the loss are separate modules (:mod:`movq.models.autoencoder`, :mod:`movq.training.losses`);
the schedule around the step (logging, evaluation, checkpoints, resume, stopping) is
:class:`movq.training.loop.TrainLoop`, shared with the prior.

Guarantees: every rank reads its own data; only rank 0 writes; checkpoints are atomic and a resume is
bit-exact on CPU (the data stream is a pure function of seed and position, RNG states are restored); a
non-finite loss or gradient skips the step and leaves no trace (BatchNorm statistics, the quantizer's
codebook, EMA and usage are restored); SIGINT / SIGTERM save and exit, SIGUSR1 saves and goes on.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator

from movq.config import ConfigError, TokenizerConfig, check_config
from movq.data.stream import build_dataloader, build_dataset, train_batches
from movq.evaluation.metrics import SSIM_MIN_SIZE, TokenizerMetrics
from movq.evaluation.visualize import save_grid, save_usage_chart
from movq.models.autoencoder import MoVQ
from movq.models.discriminator import PatchDiscriminator
from movq.training.loop import TrainLoop, mean_micro_logs
from movq.training.losses import TokenizerLoss
from movq.training.run import eval_mode, schedule_lambda, schedule_settings
from movq.utils import load_weights, save_state_dict

log = logging.getLogger(__name__)

GRID_IMAGES = 8  # columns of the reconstruction grid
DISCRIMINATOR_NAME = "discriminator.safetensors"


def check_run_config(cfg: TokenizerConfig) -> None:
    """What no single section can check: every attention resolution is one the model has, and the images
    are large enough for the discriminator and the evaluation. ``ConfigError`` naming the key."""
    check_config(cfg)
    m = cfg.model
    sizes = [m.resolution // 2**i for i in range(len(m.channel_mult))]  # feature maps, level by level
    never = [r for r in m.attn_resolutions if r not in sizes]
    if never:
        raise ConfigError(f"config key 'model.attn_resolutions': {never} never reached: the feature maps are "
                          f"{sizes} (model.resolution={m.resolution} halved at each of the "
                          f"{len(m.channel_mult) - 1} downsamplings of model.channel_mult)")
    widths = [m.base_channels * k for k in m.channel_mult]
    if any(w % m.norm_groups for w in widths):
        raise ConfigError(f"config key 'model.norm_groups': {m.norm_groups} does not divide every width "
                          f"(model.base_channels × model.channel_mult = {widths})")
    need = {f"the discriminator (discriminator.n_layers={cfg.discriminator.n_layers})": cfg.discriminator.min_image_size(),
            "the held-out SSIM": SSIM_MIN_SIZE}
    if cfg.data.image_size < max(need.values()):
        raise ConfigError(f"config key 'data.image_size': {cfg.data.image_size} is too small; "
                          + ", ".join(f"{who} needs ≥ {n}" for who, n in need.items()))


class TokenizerTrainer(TrainLoop):
    """Builds everything from a ``TokenizerConfig``; ``fit()`` trains to ``train.max_steps``."""

    unit = "images"
    fid_key = "val/rfid"

    def __init__(self, cfg: TokenizerConfig, accelerator: Optional[Accelerator] = None):
        check_run_config(cfg)
        # Both splits now, not at the first evaluation: a missing or empty data.val / data.train is an
        # error before anything trains (every run evaluates, at least at its last step).
        for split in ("train", "val"):
            build_dataset(cfg.data, split)
        super().__init__(cfg, accelerator)

    def build(self) -> None:
        acc, cfg, t = self.acc, self.cfg, self.cfg.train
        model = MoVQ(cfg)
        disc = PatchDiscriminator(cfg.discriminator)
        self.loss_fn = TokenizerLoss(cfg.loss).to(acc.device)
        self.ema = self.make_ema(model)
        params_g = [p for p in model.parameters() if p.requires_grad]
        opt_g = torch.optim.Adam(params_g, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        opt_d = torch.optim.Adam(disc.parameters(), lr=t.disc_lr or t.lr, betas=t.betas, weight_decay=t.weight_decay)
        sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, schedule_lambda(t))
        # D steps from loss.disc_start on (its warmup starts there); its decay ends at max_steps too
        sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, schedule_lambda(t, self.disc_total_steps))
        (self.model, self.disc, self.optimizer, self.opt_d, self.sched_g, self.sched_d) = acc.prepare(
            model, disc, opt_g, opt_d, sched_g, sched_d
        )

    @property
    def disc_total_steps(self) -> int:
        """Optimizer steps of the discriminator in a run to ``train.max_steps``."""
        return max(1, self.cfg.train.max_steps - max(0, self.cfg.loss.disc_start))

    def lr_schedules(self) -> dict:
        return {"generator": schedule_settings(self.cfg.train),
                "discriminator": schedule_settings(self.cfg.train, self.disc_total_steps)}

    # ------------------------------------------------------------------ checkpoints
    def write_weights(self, folder: Path) -> None:
        self.acc.unwrap_model(self.model).save_pretrained(folder / "model")
        if self.ema is not None:
            self.ema.model.save_pretrained(folder / "ema")
        save_state_dict(self.acc.unwrap_model(self.disc).state_dict(), folder / DISCRIMINATOR_NAME)

    def read_weights(self, folder: Path) -> None:
        load_weights(self.acc.unwrap_model(self.model), folder / "model" / "model.safetensors")
        if self.ema is not None:
            load_weights(self.ema.model, folder / "ema" / "model.safetensors")
        load_weights(self.acc.unwrap_model(self.disc), folder / DISCRIMINATOR_NAME)

    # ------------------------------------------------------------------ one optimizer step
    def batches(self, start: int) -> Iterator[dict]:
        acc = self.acc
        return train_batches(self.cfg.data, rank=acc.process_index, world_size=acc.num_processes, start_step=start)

    def train_step(self, micro_batches: list[dict]) -> Optional[dict]:
        """Generator and discriminator passes of every micro-batch, then clip, check and step both."""
        acc, t = self.acc, self.cfg.train
        keep = self.forward_state(self.model, self.disc)  # a skipped step leaves no trace in any buffer
        logs = mean_micro_logs([self.micro_step(b["image"].to(acc.device, non_blocking=True)) for b in micro_batches])
        max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
        gan = "d_total" in logs
        norm_g = acc.clip_grad_norm_(self.model.parameters(), max_norm)
        norm_d = acc.clip_grad_norm_(self.disc.parameters(), max_norm) if gan else None
        ok = self.finite(logs["loss"], norm_g, logs.get("d_total"), norm_d)
        if ok:
            self.optimizer.step()
            self.sched_g.step()
            if gan:
                self.opt_d.step()
                self.sched_d.step()
            if self.ema is not None:
                self.ema.update(acc.unwrap_model(self.model))
        else:
            keep.restore()
        self.optimizer.zero_grad(set_to_none=True)
        self.opt_d.zero_grad(set_to_none=True)
        logs["grad_norm"] = norm_g
        if norm_d is not None:
            logs["d_grad_norm"] = norm_d
        return logs if ok else None

    def micro_step(self, x: torch.Tensor) -> dict:
        """Generator and discriminator forward and backward on images ``x [B, 3, H, W]`` (gradients
        accumulate until ``train_step`` steps; tools/bench_train.py times this)."""
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
                # Real and fake in separate calls, as taming: BatchNorm normalises each batch by its own
                # statistics, as in the generator's pass above (fakes only).
                with acc.autocast():
                    real = self.disc(x)
                    fake = self.disc(x_rec.detach())
                d_loss, d_logs = self.loss_fn.discriminator_loss(real, fake)
                acc.backward(d_loss)
                logs.update(d_logs)
                logs["d_total"] = d_loss.detach()
        return logs

    # ------------------------------------------------------------------ evaluation
    def _eval_model(self) -> MoVQ:
        return self.ema.model if self.ema is not None else self.acc.unwrap_model(self.model)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """PSNR / SSIM / LPIPS / usage / perplexity of the EMA (or live) model on the held-out split."""
        acc, model = self.acc, self._eval_model()
        with eval_mode(model):
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
                pictures = {}
                if first is not None:
                    pictures["images/reconstruction"] = save_grid(first, self.run.images / f"recon_{self.step:07d}.png")
                pictures["images/codebook_usage"] = save_usage_chart(metrics.state["code_counts"],
                                                                     self.run.images / f"usage_{self.step:07d}.png")
                self.log_images(pictures)
        return {f"val/{k}": v for k, v in results.items() if v is not None}

    @torch.no_grad()
    def compute_fid(self) -> Optional[float]:
        """rFID of the EMA (or live) model on the first ``train.fid_num_images`` held-out images
        (split over ranks), or None when the Inception weights are absent (logged once)."""
        if self.fid is None or self.fid.extractor() is None:
            return None
        acc, model = self.acc, self._eval_model()
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

        with eval_mode(model):
            self.fid.ensure_reference(originals())  # computed once, then read from the cache file
            return self.fid.compute(reconstructions())
