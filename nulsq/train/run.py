"""`run(cfg)`: one training run from a composed config, start to summary, as a recipe.

    preflight   validate the config, plan its stages, check everything (nulsq.train.preflight)
    setup       run directory and resume point -> config.yaml -> seeds -> data -> logger -> model
    train       each planned stage (nulsq.train.plan): FP, then quantize + initial step sizes
                (or a merge from a (b+1)-bit run) + QAT
    cleanup     summary.json and the final line, also when a stage fails

Each stage checkpoints every epoch, so `trainer.resume=auto` continues either stage exactly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from nulsq import data as datasets
from nulsq.code_version import code_version
from nulsq.config import validate
from nulsq.errors import UserError
from nulsq.log import build_logger, quantizer_snapshot
from nulsq.log.histograms import eval_histograms
from nulsq.protocol import run_protocol
from nulsq.quant import initialize_quantizers, kernels
from nulsq.quant.kernels.cpu_rivals import EAGER_FASTER_ON_CPU
from nulsq.quant.progressive import load_progressive
from nulsq.train import distributed as D
from nulsq.train.build import build_model, quantize
from nulsq.train.checkpoint import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    config_fingerprint,
    find_resume,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from nulsq.train.loop import StageState, StepContext, evaluate, train_epoch
from nulsq.train.plan import StagePlan, build_stage_optim, is_quantized
from nulsq.train.preflight import preflight, progressive_source
from nulsq.train.runtime import Runtime, resolve_runtime, seed_everything

logger = logging.getLogger(__name__)  # console, train.log and W&B (nulsq/log/console.py)


def _run_dir(cfg: DictConfig) -> tuple[Path, str]:
    """(folder, the key that chose it): trainer.output_dir, else Hydra's run directory, else
    runs/<experiment>/<time>."""
    if cfg.trainer.output_dir:
        return Path(cfg.trainer.output_dir), "trainer.output_dir"
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir), "hydra.run.dir"
    except (ImportError, ValueError):
        return Path("runs") / cfg.experiment / time.strftime("%Y%m%d-%H%M%S"), "trainer.output_dir"


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


@dataclass
class RunContext:
    """What every stage of one run shares (built by the setup steps)."""

    cfg: DictConfig
    runtime: Runtime
    dist: D.DistInfo
    run_dir: Path
    fingerprint: str  # of the config, stored in every checkpoint (see checkpoint.find_resume)
    bundle: datasets.DataBundle
    log: object  # RunLogger


class _Stage:
    """One planned training stage (FP pretraining or QAT) of `model`: its optimizers, schedule,
    counters and checkpoints."""

    def __init__(self, plan: StagePlan, model: nn.Module, ctx: RunContext, step_offset: int = 0):
        cfg, bundle = ctx.cfg, ctx.bundle
        self.name, self.plan, self.cfg, self.raw_model = plan.name, plan, cfg, model
        self.bundle, self.runtime, self.dist, self.log = bundle, ctx.runtime, ctx.dist, ctx.log
        self.run_dir, self.fingerprint = ctx.run_dir, ctx.fingerprint
        self.optimizers, self.schedulers = build_stage_optim(model, plan, len(bundle.train))
        self.state = StageState(plan.name, plan.epochs, len(bundle.train))
        self.ctx = StepContext(ctx.runtime, ctx.dist, self.optimizers, self.schedulers, ctx.log,
                               cfg.trainer.log_interval, cfg.trainer.max_steps, plan.step_guard,
                               cfg.quantizer.step_floor)
        self.state.step_offset = step_offset
        self.model = _wrap(model, ctx.runtime, ctx.dist, cfg.trainer.sync_bn)
        # Evaluation needs no DDP: its per-forward buffer broadcast would hang on val shards with
        # unequal batch counts. Rank 0's buffers are broadcast once before each evaluation instead.
        self.eval_model = model if ctx.dist.enabled else self.model

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
        save_checkpoint(self.run_dir / "checkpoints" / path_name, {
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
        }, self.cfg)

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
                self.log.log("quantizers", {"epoch": metrics["epoch"], **quantizer_snapshot(self.raw_model),
                                            **eval_histograms(self.raw_model, self.bundle.val, self.runtime,
                                                              self.dist)}, step=s.step_offset + s.step)
            if self.dist.is_main:
                stopped = "" if complete else " (stopped)"
                logger.info(f"[{self.name}] epoch {metrics['epoch']}/{s.epochs}{stopped}: "
                            f"train loss {metrics['train/loss']:.4f} top-1 {metrics['train/top1']:.2f} | "
                            f"val top-1 {metrics['val/top1']:.2f} top-5 {metrics['val/top5']:.2f} | "
                            f"{metrics['train/images_per_s']:,.0f} img/s")
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
    plan = preflight(cfg, *_run_dir(cfg))  # every mistake, before any data or step
    device_type = "cuda" if cfg.trainer.device != "cpu" and torch.cuda.is_available() else "cpu"
    dist = D.init_distributed(device_type)
    try:
        D.check_sync_bn(cfg.trainer.sync_bn, device_type, dist)
        ctx, ckpt = _setup(cfg, dist)
        summary = {**_meta(cfg), "status": "running", "run_dir": str(ctx.run_dir),
                   "runtime": _runtime_meta(ctx.runtime, dist),
                   "protocol": run_protocol(cfg, ctx.runtime.amp), "code": code_version()}
        try:
            model = _setup_model(ctx, ckpt)
            stages, last = _train(plan, model, ctx, ckpt, summary)
        except BaseException as err:
            _record_failure(ctx, summary, err)
            raise
        return _finish(ctx, stages, last, summary, t_start)
    finally:
        D.cleanup(dist)


# -- setup ---------------------------------------------------------------------------------------


def _setup(cfg: DictConfig, dist: D.DistInfo) -> tuple[RunContext, dict | None]:
    """Run directory and resume point, config.yaml, seeds, data, logger; returns the run's
    context and the checkpoint to resume from (None for a fresh start)."""
    runtime = resolve_runtime(cfg.trainer, dist.local_rank)
    run_dir = Path(D.broadcast_object(str(_run_dir(cfg)[0]), dist))
    fingerprint = config_fingerprint(cfg)
    # Rank 0 picks (siblings are ordered by mtime), so every rank resumes the same file.
    found = find_resume(cfg.trainer.resume, run_dir, fingerprint)
    resume_path = D.broadcast_object(found, dist)
    ckpt = load_checkpoint(resume_path, cfg.trainer.trust_checkpoint) if resume_path else None
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
    log = build_logger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
                       _meta(cfg), rank=dist.rank, resume_id=ckpt.get("wandb_id") if ckpt else None)
    if dist.is_main:
        logger.info(f"run directory: {run_dir}")
        _warn_cpu_compile(cfg, runtime)
    return RunContext(cfg, runtime, dist, run_dir, fingerprint, bundle, log), ckpt


def _warn_cpu_compile(cfg: DictConfig, runtime: Runtime) -> None:
    """One line when torch.compile on the CPU would slow this run's rival quantizers down."""
    kinds = {spec.kind for spec in (cfg.quantizer.weight, cfg.quantizer.act) if spec is not None}
    slow = sorted(kinds & set(EAGER_FASTER_ON_CPU))
    if runtime.compile and runtime.device.type == "cpu" and slow:
        logger.warning(f"trainer.compile=true on the CPU: {', '.join(slow)} quantizers train faster "
                       f"eager (C kernels) than compiled; set trainer.compile=auto")


def _setup_model(ctx: RunContext, ckpt: dict | None) -> nn.Module:
    """The FP network on the run's device, the same on every rank (pretrained weights unless a
    checkpoint will overwrite them)."""
    model, _ = build_model(ctx.cfg, ctx.bundle.num_classes, quantized=False, verbose=False,
                           load_pretrained=ckpt is None, image_size=ctx.bundle.image_size)
    model = model.to(ctx.runtime.device)
    D.broadcast_state(model, ctx.dist)  # ranks seed differently: start every rank from rank 0's net
    if ctx.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# -- train ---------------------------------------------------------------------------------------


def _train(plan: list[StagePlan], model: nn.Module, ctx: RunContext, ckpt: dict | None,
           summary: dict) -> tuple[list[_Stage], dict]:
    """Run the planned stages, from the checkpoint's stage when resuming; a stage stopped by
    trainer.max_steps ends the call (the next one starts on resume). Returns the stages run and
    the last metrics of the last one."""
    order = [p.name for p in plan]
    first = order.index(ckpt["stage"]) if ckpt else 0
    stages: list[_Stage] = []
    last: dict = {}
    for stage_plan in plan[first:]:
        if not all(stage.finished for stage in stages):
            break
        resume = ckpt if ckpt is not None and ckpt["stage"] == stage_plan.name else None
        if stage_plan.quantized:
            _enter_qat(model, ctx, stages, summary, fresh=resume is None)
        stage = _Stage(stage_plan, model, ctx, step_offset=stages[-1].state.step if stages else 0)
        if stage_plan.quantized:
            stage.state.fp_top1 = summary.get("fp_top1")
        if resume is not None:
            stage.load(resume)
            if stage_plan.quantized:
                summary["fp_top1"] = stage.state.fp_top1
        last = stage.train()
        stages.append(stage)
        if not stage_plan.quantized:
            _leave_fp(stage, last, ctx, summary)
    return stages, last


def _leave_fp(stage: _Stage, last: dict, ctx: RunContext, summary: dict) -> None:
    """After the FP stage: its top-1 in the summary, and (before QAT) the FP model as fp.pt."""
    summary["fp_top1"] = _final_eval(stage, last)["val/top1"]
    if is_quantized(ctx.cfg) and ctx.dist.is_main and stage.finished:
        atomic_torch_save(ctx.run_dir / "checkpoints" / "fp.pt", {"model": stage.raw_model.state_dict()})


def _enter_qat(model: nn.Module, ctx: RunContext, stages: list[_Stage], summary: dict,
               fresh: bool) -> None:
    """Quantize `model` in place; on a fresh start (not a QAT resume) also evaluate the FP model
    if no stage did, and set the initial step sizes."""
    if summary.get("fp_top1") is None and fresh:
        summary["fp_top1"] = evaluate(model, ctx.bundle.val, ctx.runtime, ctx.dist)["val/top1"]
    quantize(model, ctx.cfg, verbose=ctx.dist.is_main and fresh)
    if ctx.runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    if fresh:
        fp_steps = stages[-1].state.step if stages else 0
        _init_steps(ctx.cfg, model, ctx.bundle, ctx.dist, ctx.log, step=fp_steps)


# -- cleanup -------------------------------------------------------------------------------------


def _record_failure(ctx: RunContext, summary: dict, err: BaseException) -> None:
    """summary.json with status "failed" and the error's first line; the logger closed."""
    summary["status"] = "failed"
    summary["error"] = f"{type(err).__name__}: {err}".splitlines()[0]
    if ctx.dist.is_main:
        atomic_write_json(ctx.run_dir / "summary.json", summary)
    ctx.log.finish(summary)


def _finish(ctx: RunContext, stages: list[_Stage], last: dict, summary: dict, t_start: float) -> dict:
    """The summary of a run that ended well (finished, or stopped by trainer.max_steps)."""
    cfg, final = ctx.cfg, stages[-1]
    last = _final_eval(final, last)
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
    if ctx.dist.is_main:
        atomic_write_json(ctx.run_dir / "summary.json", summary)
        logger.info(_final_line(summary, cfg, stopped))
    ctx.log.finish(summary)
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
        path, source = progressive_source(cfg, keep=False)  # as the preflight read it: no 2nd read
        load_progressive(model, path, cfg.trainer.trust_checkpoint, source)
        note = {"method": "progressive", "from_run": str(cfg.init.from_run)}
    else:
        bundle.train.set_epoch(0)
        # Every rank observes the gathered global batches (what one process would see), so the
        # steps do not depend on the number of ranks; rank 0's are then broadcast.
        seen = initialize_quantizers(model, D.GlobalBatches(bundle.train, dist), cfg.init.batches,
                                     cfg.init.protocol)
        note = {"method": cfg.init.method, "batches": seen, "protocol": cfg.init.protocol}
    D.broadcast_state(model, dist)
    log.log("init", {**note, **quantizer_snapshot(model)}, step=step)
