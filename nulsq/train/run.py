"""`run(cfg)`: one training run from a composed config, start to summary.

Reads straight down: validate -> run directory -> data -> model -> [FP pretraining stage] ->
quantize -> initialise step sizes (or merge from a (b+1)-bit run) -> QAT stage -> summary.json.
Each stage checkpoints every epoch, so `trainer.resume=auto` continues either stage exactly.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from nulsq import data as datasets
from nulsq.config import validate
from nulsq.errors import UserError
from nulsq.log import build_logger, quantizer_snapshot
from nulsq.paths import check_data_dir
from nulsq.quant import initialize_quantizers, kernels
from nulsq.quant.from_run import load_progressive, resolve_run_checkpoint
from nulsq.train import distributed as D
from nulsq.train.build import build_model, quantize
from nulsq.train.checkpoint import (atomic_torch_save, atomic_write_json, atomic_write_text,
                                    config_fingerprint, find_resume, load_checkpoint, rng_state,
                                    set_rng_state)
from nulsq.train.loop import StageState, StepContext, evaluate, train_epoch
from nulsq.train.optim import build_optimizers, build_schedulers
from nulsq.train.runtime import Runtime, resolve_runtime, seed_everything


def _run_dir(cfg: DictConfig) -> Path:
    """trainer.output_dir, else Hydra's run directory, else runs/<experiment>/<time>."""
    if cfg.trainer.output_dir:
        return Path(cfg.trainer.output_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return Path("runs") / cfg.experiment / time.strftime("%Y%m%d-%H%M%S")


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"cannot write to the output directory {run_dir} ({err.strerror}); "
            f"set trainer.output_dir or hydra.run.dir to a writable folder"
        ) from None


def _check_values(cfg: DictConfig) -> None:
    """Values that can never train, rejected before any work."""
    if cfg.trainer.epochs <= 0:
        raise UserError(f"trainer.epochs must be > 0, got {cfg.trainer.epochs}")
    if cfg.dataset.batch_size <= 0:
        raise UserError(f"dataset.batch_size must be > 0, got {cfg.dataset.batch_size}")
    if cfg.trainer.max_steps is not None and cfg.trainer.max_steps <= 0:
        raise UserError(f"trainer.max_steps must be > 0 or null, got {cfg.trainer.max_steps}")
    if cfg.pretrain.epochs < 0 or cfg.pretrain.lr <= 0:
        raise UserError("pretrain.epochs must be >= 0 and pretrain.lr > 0")
    if cfg.quantizer.step_guard not in ("stop", "clamp"):
        raise UserError(f"unknown quantizer.step_guard '{cfg.quantizer.step_guard}'; valid: clamp, stop")
    if cfg.init.from_run:  # a progressive run whose source is missing fails before any work
        resolve_run_checkpoint(cfg.init.from_run)
    if cfg.trainer.log_interval <= 0:
        raise UserError(f"trainer.log_interval must be > 0, got {cfg.trainer.log_interval}")


def _meta(cfg: DictConfig) -> dict:
    """Run identity for W&B grouping/tags and for summary.json."""
    return {
        "experiment": cfg.experiment,
        "table": cfg.table,
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "method": cfg.quantizer.name,
        "bits": cfg.quantizer.bits,
        "seed": cfg.trainer.seed,
    }


def _runtime_meta(runtime: Runtime, dist: D.DistInfo) -> dict:
    """How the run computed, for reading its images_per_s beside other runs'."""
    return {
        "device": str(runtime.device),
        "world_size": dist.world_size,
        "bf16": runtime.amp,
        "channels_last": runtime.channels_last,
        "compile": runtime.compile,
        "fast_kernels": kernels.enabled(),  # device types with fast paths ("compile": fused)
        "torch": torch.__version__,
    }


def _wrap(model: nn.Module, runtime: Runtime, dist: D.DistInfo, sync_bn: bool) -> nn.Module:
    """The module the loop calls: DDP and/or torch.compile around the raw model."""
    if dist.enabled:
        if sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if runtime.compile:
        model = torch.compile(model)
    return model


class _Stage:
    """One training stage (FP pretraining or QAT) with its optimizers, schedule and checkpoints."""

    def __init__(self, name, cfg, model, bundle, runtime, dist, log, run_dir, optim_cfg, sched_cfg,
                 epochs, fingerprint, step_offset=0):
        self.name, self.cfg, self.raw_model = name, cfg, model
        self.bundle, self.runtime, self.dist, self.log, self.run_dir = bundle, runtime, dist, log, run_dir
        self.fingerprint = fingerprint
        self.optimizers = build_optimizers(model, optim_cfg)
        self.schedulers = build_schedulers(self.optimizers, sched_cfg, optim_cfg, len(bundle.train),
                                           epochs)
        self.state = StageState(name, epochs, len(bundle.train))
        self.ctx = StepContext(runtime, dist, self.optimizers, self.schedulers, log,
                               cfg.trainer.log_interval, cfg.trainer.max_steps,
                               cfg.quantizer.step_guard if name == "qat" else "none",
                               cfg.quantizer.step_floor)
        self.state.step_offset = step_offset
        self.model = _wrap(model, runtime, dist, cfg.trainer.sync_bn)
        # Evaluation needs no DDP: its per-forward buffer broadcast would hang on val shards with
        # unequal batch counts. Rank 0's buffers are broadcast once before each evaluation instead.
        self.eval_model = model if dist.enabled else self.model

    @property
    def finished(self) -> bool:
        return self.state.epoch >= self.state.epochs

    def load(self, ckpt: dict) -> None:
        self.raw_model.load_state_dict(ckpt["model"])
        for n, opt in self.optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][n])
            self.schedulers[n].load_state_dict(ckpt["schedulers"][n])
        for key, value in ckpt["state"].items():
            setattr(self.state, key, value)
        set_rng_state(ckpt["rng"], self.dist.rank)
        if not self.dist.is_main:  # rank 0 saved the partial epoch sums of all ranks
            self.state.partial = [0.0, 0.0, 0.0]

    def save(self, path_name: str = "last.pt") -> None:
        rng = D.gather_object(rng_state(), self.dist)  # every rank's, for an exact DDP resume
        if not self.dist.is_main:
            return
        atomic_torch_save(self.run_dir / "checkpoints" / path_name, {
            "stage": self.name,
            "model": self.raw_model.state_dict(),
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
            "state": dict(vars(self.state)),
            "rng": rng,
            "fingerprint": self.fingerprint,
            "num_classes": self.bundle.num_classes,
            "image_size": self.bundle.image_size,
            "wandb_id": self.log.wandb_id,
        })

    def train(self) -> dict:
        """Run the remaining epochs (a stop by max_steps ends mid-epoch, checkpointed there)."""
        s, last = self.state, {}
        while s.epoch < s.epochs:
            if self.cfg.trainer.max_steps is not None and s.step >= self.cfg.trainer.max_steps:
                break
            self.bundle.train.set_epoch(s.epoch, skip=s.steps_into_epoch)
            t0 = time.perf_counter()
            metrics = train_epoch(self.model, self.raw_model, self.bundle.train, s, self.ctx)
            D.broadcast_buffers(self.raw_model, self.dist)
            metrics.update(evaluate(self.eval_model, self.bundle.val, self.runtime, self.dist))
            complete = s.steps_into_epoch >= s.steps_per_epoch
            metrics.update({"epoch": s.epoch + 1, "stage": self.name, "complete": complete,
                            "epoch_time_s": time.perf_counter() - t0})
            if complete:
                if metrics["val/top1"] > s.best_top1:
                    s.best_top1, s.best_epoch = metrics["val/top1"], s.epoch + 1
                s.history.append({k: v for k, v in metrics.items() if k != "stage"})
                s.epoch += 1
            self.log.log("epoch", metrics, step=s.step_offset + s.step)
            if self.name == "qat":
                self.log.log("quantizers", {"epoch": metrics["epoch"], **quantizer_snapshot(self.raw_model)},
                             step=s.step_offset + s.step)
            if self.dist.is_main:
                print(f"[{self.name}] epoch {metrics['epoch']}/{s.epochs}{'' if complete else ' (stopped)'}: "
                      f"train loss {metrics['train/loss']:.4f} top-1 {metrics['train/top1']:.2f} | "
                      f"val top-1 {metrics['val/top1']:.2f} top-5 {metrics['val/top5']:.2f} | "
                      f"{metrics['train/images_per_s']:,.0f} img/s", flush=True)
            self.save()
            last = metrics
            if not complete:
                break
        return last


def _final_eval(stage: _Stage, last: dict) -> dict:
    """The metrics of the stage's last evaluation (evaluating now if it ran none this time)."""
    if last:
        return last
    if stage.state.history:
        return stage.state.history[-1]
    return evaluate(stage.eval_model, stage.bundle.val, stage.runtime, stage.dist)


def run(cfg: DictConfig) -> dict:
    """Train as `cfg` says; returns the summary that is also written to summary.json."""
    t_start = time.time()
    cfg = validate(cfg)
    _check_values(cfg)
    check_data_dir(cfg.paths.data_dir)
    device_type = "cuda" if cfg.trainer.device != "cpu" and torch.cuda.is_available() else "cpu"
    dist = D.init_distributed(device_type)
    try:
        D.check_sync_bn(cfg.trainer.sync_bn, device_type, dist)
        return _run(cfg, dist, t_start)
    finally:
        D.cleanup(dist)


def _run(cfg: DictConfig, dist: D.DistInfo, t_start: float) -> dict:
    runtime = resolve_runtime(cfg.trainer, dist.local_rank)
    run_dir = Path(D.broadcast_object(str(_run_dir(cfg)), dist))
    fingerprint = config_fingerprint(cfg)
    # Rank 0 picks (siblings are ordered by mtime), so every rank resumes the same file.
    found = find_resume(cfg.trainer.resume, run_dir, fingerprint)
    resume_path = D.broadcast_object(found, dist)
    ckpt = load_checkpoint(resume_path) if resume_path else None
    if resume_path is not None:
        run_dir = resume_path.parent.parent
    if ckpt is not None and ckpt["fingerprint"] != fingerprint:
        raise UserError(
            f"checkpoint {resume_path} belongs to a run with a different config; resume with the "
            f"same config, or start a new run without trainer.resume"
        )
    if dist.is_main:
        _check_writable(run_dir)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    seed_everything(cfg.trainer.seed + dist.rank)
    torch.backends.cudnn.benchmark = True

    bundle = datasets.build(cfg.dataset, runtime.device, cfg.trainer.seed, dist.rank, dist.world_size)
    log = build_logger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True), _meta(cfg),
                       rank=dist.rank, resume_id=ckpt.get("wandb_id") if ckpt else None)
    if dist.is_main:
        print(f"run directory: {run_dir}", flush=True)

    quantized = cfg.quantizer.weight is not None or cfg.quantizer.act is not None
    resume_stage = ckpt["stage"] if ckpt else None
    summary = {**_meta(cfg), "status": "running", "run_dir": str(run_dir),
               "runtime": _runtime_meta(runtime, dist)}
    stages: list[_Stage] = []
    try:
        model, _ = build_model(cfg, bundle.num_classes, quantized=False, verbose=False,
                               load_pretrained=ckpt is None, image_size=bundle.image_size)
        model = model.to(runtime.device)
        D.broadcast_state(model, dist)  # ranks seed differently: start every rank from rank 0's net
        if runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)

        # Stage 1: full-precision pretraining inside this run (the embedded demo).
        fp_epochs = cfg.pretrain.epochs if quantized else cfg.trainer.epochs
        if fp_epochs > 0 and resume_stage in (None, "fp"):
            optim_cfg, sched_cfg = cfg.optim, cfg.schedule
            if quantized:  # the demo's FP stage has its own lr, weight decay and warm-up
                optim_cfg = OmegaConf.create({
                    "weights": {**cfg.optim.weights, "lr": cfg.pretrain.lr,
                                "weight_decay": cfg.pretrain.weight_decay},
                    "quant": cfg.optim.quant})
                sched_cfg = OmegaConf.create({"name": "cosine", "warmup_lr": 0.0,
                                              "warmup_epochs": cfg.pretrain.warmup_epochs})
            fp = _Stage("fp", cfg, model, bundle, runtime, dist, log, run_dir, optim_cfg, sched_cfg,
                        fp_epochs, fingerprint)
            if resume_stage == "fp":
                fp.load(ckpt)
                ckpt = None
            fp_last = fp.train()
            stages.append(fp)
            summary["fp_top1"] = _final_eval(fp, fp_last)["val/top1"]
            if quantized and dist.is_main and fp.finished:
                atomic_torch_save(run_dir / "checkpoints" / "fp.pt", {"model": model.state_dict()})

        # Stage 2: quantization-aware training (not before a max_steps stop of stage 1 is resumed).
        if quantized and all(stage.finished for stage in stages):
            if summary.get("fp_top1") is None and ckpt is None:
                summary["fp_top1"] = evaluate(model, bundle.val, runtime, dist)["val/top1"]
            quantize(model, cfg, verbose=dist.is_main and ckpt is None)
            if runtime.channels_last:
                model = model.to(memory_format=torch.channels_last)
            fp_steps = stages[0].state.step if stages else 0
            if ckpt is None:
                _init_steps(cfg, model, bundle, dist, log, step=fp_steps)
            qat = _Stage("qat", cfg, model, bundle, runtime, dist, log, run_dir, cfg.optim,
                         cfg.schedule, cfg.trainer.epochs, fingerprint,
                         step_offset=fp_steps)
            qat.state.fp_top1 = summary.get("fp_top1")
            if ckpt is not None:
                qat.load(ckpt)
                summary["fp_top1"] = qat.state.fp_top1
            qat_last = qat.train()
            stages.append(qat)
    except BaseException as err:
        summary["status"] = "failed"
        summary["error"] = f"{type(err).__name__}: {err}".splitlines()[0]
        if dist.is_main:
            atomic_write_json(run_dir / "summary.json", summary)
        log.finish(summary)
        raise

    final = stages[-1]
    last = _final_eval(final, qat_last if final.name == "qat" else fp_last)
    seconds = sum(s.state.train_seconds for s in stages)
    images = sum(s.state.images_seen for s in stages)
    stopped = cfg.trainer.max_steps is not None and final.state.epoch < final.state.epochs
    summary.update({
        "status": "stopped" if stopped else "finished",
        "top1": last["val/top1"],
        "top5": last["val/top5"],
        "stage": final.name,
        "best_top1": final.state.best_top1 if final.state.best_epoch > 0 else None,
        "best_epoch": final.state.best_epoch if final.state.best_epoch > 0 else None,
        "epochs": final.state.epoch,
        "steps": final.state.step,
        "images_per_s": final.state.images_seen / max(final.state.train_seconds, 1e-9),
        "all_stages_images_per_s": images / max(seconds, 1e-9),
        "wall_time_s": time.time() - t_start,
    })
    if dist.is_main:
        atomic_write_json(run_dir / "summary.json", summary)
        print(_final_line(summary, cfg, stopped), flush=True)
    log.finish(summary)
    return summary


def _final_line(summary: dict, cfg: DictConfig, stopped: bool) -> str:
    """The run's last printed line: FP and quantized top-1 when both stages ran."""
    best = "" if summary["best_top1"] is None else f" (best {summary['best_top1']:.2f}%)"
    if summary["stage"] == "qat" and summary.get("fp_top1") is not None:
        line = (f"final: FP top-1 {summary['fp_top1']:.2f}% | {cfg.quantizer.name} "
                f"{cfg.quantizer.bits}-bit top-1 {summary['top1']:.2f}%{best}")
    else:
        line = f"final: {summary['stage']} top-1 {summary['top1']:.2f}%{best}"
    if stopped:
        line += (f"; stopped by trainer.max_steps in the {summary['stage']} stage, "
                 f"continue with trainer.resume=auto")
    return line


def _init_steps(cfg: DictConfig, model: nn.Module, bundle, dist: D.DistInfo, log, step: int) -> None:
    """Initial step sizes: merged from a (b+1)-bit run, or observed on training batches."""
    if cfg.init.from_run:
        load_progressive(model, cfg.init.from_run)
        note = {"method": "progressive", "from_run": str(cfg.init.from_run)}
    else:
        bundle.train.set_epoch(0)
        # Every rank observes the gathered global batches (what one process would see), so the
        # steps do not depend on the number of ranks; rank 0's are then broadcast.
        seen = initialize_quantizers(model, D.GlobalBatches(bundle.train, dist), cfg.init.batches)
        note = {"method": cfg.init.method, "batches": seen}
    D.broadcast_state(model, dist)
    log.log("init", {**note, **quantizer_snapshot(model)}, step=step)
