"""Every paper-table experiment and hyperparameter grid: composes, validates, says what the
supplement says, and runs end to end (tiny, CPU) with each method its table compares."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # what `-m` runs by default
from hydra.core.override_parser.overrides_parser import OverridesParser

from nulsq.config import validate
from nulsq.errors import UserError

from conftest import CONFIG_DIR, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
# Progressive rows: init.from_run must be given on the command line.
PROGRESSIVE = ["tableC_preresnet18_2bit_progressive", "tableD_preresnet18_2bit", "tableD_preresnet34_2bit"]


@functools.lru_cache(maxsize=None)  # several tests read the same composed config; none mutates it
def compose_experiment(name: str, *extra: str):
    overrides = [f"+experiment={name}", *extra]
    if name in PROGRESSIVE and not any(o.startswith("init.from_run=") for o in extra):
        overrides.append("init.from_run=runs/some_3bit_run")
    return validate(compose_config(overrides))


def test_every_table_row_has_its_experiment():
    def bits(prefix: str, widths=(2, 3, 4)) -> list[str]:
        return [f"{prefix}_{b}bit" for b in widths]

    expected = ["table1_preresnet18_2bit", *bits("table3_mobilenetv2"), *bits("table5_resnet18"),
                *bits("table7_swint"), *bits("table7_convnext"), *bits("cifar10_preresnet20"),
                *bits("cifar10_preresnet56"), *bits("tableA_preresnet20"), *bits("tableA_preresnet56"),
                *bits("tableB_preresnet20"), *bits("tableB_preresnet56"),
                "tableC_preresnet18_2bit_progressive", "tableC_preresnet18_2bit_adamw_mse",
                *bits("tableD_preresnet18"), *bits("tableD_preresnet34")]
    assert EXPERIMENTS == sorted(expected)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_validates(name):
    cfg = compose_experiment(name)
    assert cfg.experiment == name
    assert cfg.model.pretrained is True and cfg.pretrain.epochs == 0
    assert cfg.dataset.val_split == 0.0 and cfg.trainer.seed == 0
    assert cfg.schedule.name == "cosine"
    text = (CONFIG_DIR / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert f"python train.py +experiment={name}" in text
    # every row says which init protocol it uses, and points at the ledger of such choices
    assert "\n  protocol: authors" in text and cfg.init.protocol == "authors"
    assert "docs/fidelity.md" in text


@pytest.mark.parametrize("name", PROGRESSIVE)
def test_progressive_rows_need_the_higher_bit_run(name):
    placeholder = validate(compose_config([f"+experiment={name}"])).init.from_run
    assert placeholder and "init.from_run" in placeholder and not Path(placeholder).exists()
    assert compose_experiment(name, "init.from_run=runs/x/3bit").init.from_run == "runs/x/3bit"


def test_table_b_lcq_rows_reuse_the_table_a_settings():
    # D-II: LCQ on CIFAR-100 "was trained using the hyperparameters followed by the settings on CIFAR-10"
    cfg = compose_experiment("tableA_preresnet56_3bit", "dataset=cifar100", "table=B")
    base = compose_experiment("tableA_preresnet56_3bit")
    assert (cfg.table, cfg.dataset.name, cfg.quantizer.name) == ("B", "cifar100", "lcq")
    assert cfg.optim == base.optim and cfg.trainer.epochs == base.trainer.epochs


# ---------------------------------------------------------------------------------------------
# The supplement's stated values, written from its text (section per row), not from the configs.
# Keys are dotted config paths; values the supplement leaves unstated are deliberately absent.
C1_MOBILENET = {  # C-I, "Settings for nuLSQ on MobileNetV2 at Tables 3 and 4"
    "model.name": "mobilenetv2", "dataset.name": "imagenet", "dataset.batch_size": 512,
    "trainer.epochs": 90, "optim.weights.name": "sgd", "optim.weights.momentum": 0.9,
    "optim.weights.nesterov": True, "optim.quant.name": "adamw", "init.method": "mse",
}
C1_RESNET18 = {  # C-I, "Settings for existing methods and nuLSQ on original version of ResNet-18"
    "model.name": "resnet18", "dataset.name": "imagenet", "optim.weights.name": "sgd",
    "optim.weights.momentum": 0.9, "optim.weights.nesterov": True, "optim.weights.lr": 0.004,
    "optim.weights.weight_decay": 5e-5, "optim.quant.name": "adamw", "init.method": "mse",
}
C1_TABLE1 = {  # C-I, "Settings for nuLSQ on preactivation version of ResNet-18 at Table 1"
    "model.name": "preresnet18", "dataset.name": "imagenet", "dataset.batch_size": 512,
    "trainer.epochs": 90, "optim.weights.name": "sgd", "optim.weights.momentum": 0.9,
    "optim.weights.nesterov": True, "optim.weights.lr": 0.2, "optim.weights.weight_decay": 2.5e-5,
    "optim.quant.name": "adamw", "optim.quant.lr": 2e-5, "optim.quant.weight_decay": 0.0,
    "init.method": "mse",
}
C1_SWIN = {  # C-I, "Settings for nuLSQ and LSQ on Swin-T and ConvNeXt", Swin-T
    "model.name": "swin_t", "dataset.name": "imagenet", "dataset.batch_size": 1024,
    "optim.weights.name": "adamw", "optim.quant.name": "adamw", "optim.weights.lr": 4e-4,
    "init.method": "mse",
}
C1_CONVNEXT = {  # C-I, same paragraph, ConvNeXt
    "model.name": "convnext_t", "dataset.name": "imagenet", "dataset.batch_size": 1024,
    "trainer.epochs": 15, "optim.weights.name": "adamw", "optim.quant.name": "adamw",
    "optim.weights.lr": 4e-4, "optim.quant.lr": 4e-4, "optim.weights.weight_decay": 6.25e-6,
    "optim.quant.weight_decay": 0.0, "init.method": "mse",
}
C2_CIFAR = {  # C-II (CIFAR-100), which C-III (CIFAR-10 nuLSQ) replicates
    "dataset.batch_size": 128, "trainer.epochs": 300, "optim.weights.name": "sgd",
    "optim.weights.momentum": 0.9, "optim.weights.lr": 4e-2, "optim.quant.name": "adamw",
    "schedule.warmup_epochs": 10, "schedule.warmup_lr": 1e-5, "init.method": "mse",
    "init.batches": 100,
}
C3_LCQ = {  # C-III, "Settings for LCQ"
    "dataset.name": "cifar10", "quantizer.name": "lcq", "dataset.batch_size": 128,
    "trainer.epochs": 300, "optim.weights.name": "sgd", "optim.weights.momentum": 0.9,
    "optim.weights.nesterov": True, "optim.weights.lr": 0.04, "optim.quant.name": "sgd",
    "optim.quant.momentum": 0.9, "optim.quant.nesterov": True, "optim.quant.lr": 0.02,
    "optim.weights.weight_decay": 1e-4,
}
D3 = {  # D-III, "Evaluation on Resnet architecture" (Table D)
    "dataset.name": "imagenet", "dataset.batch_size": 256, "optim.weights.name": "sgd",
    "optim.weights.momentum": 0.9, "optim.weights.nesterov": False, "optim.quant.name": "sgd",
    # "gradient scaling"; which N the supplement does not say: the authors' code's (docs/fidelity.md)
    "quantizer.grad_scale": "authors", "schedule.warmup_epochs": 0,
}
D3_FROM_FP = {**D3, "trainer.epochs": 90, "optim.weights.lr": 0.01, "init.method": "lsq",
              "init.batches": 1000}
D3_PROGRESSIVE = {**D3, "trainer.epochs": 60, "optim.weights.lr": 0.001,
                  "optim.weights.weight_decay": 0.25e-4}
D3_WD = {3: 0.5e-4, 4: 1e-4}

SUPPLEMENT: dict[str, dict] = {
    "table1_preresnet18_2bit": C1_TABLE1,
    # MobileNetV2: lr 0.4 (2-bit) / 0.04 (3, 4), step lr = lr / 100, wd 6.25e-6 (2, 3) / 1.25e-5 (4)
    "table3_mobilenetv2_2bit": {**C1_MOBILENET, "quantizer.bits": 2, "optim.weights.lr": 0.4,
                                "optim.quant.lr": 0.004, "optim.weights.weight_decay": 6.25e-6},
    "table3_mobilenetv2_3bit": {**C1_MOBILENET, "quantizer.bits": 3, "optim.weights.lr": 0.04,
                                "optim.quant.lr": 0.0004, "optim.weights.weight_decay": 6.25e-6},
    "table3_mobilenetv2_4bit": {**C1_MOBILENET, "quantizer.bits": 4, "optim.weights.lr": 0.04,
                                "optim.quant.lr": 0.0004, "optim.weights.weight_decay": 1.25e-5},
    **{f"table5_resnet18_{b}bit": {**C1_RESNET18, "quantizer.bits": b} for b in (2, 3, 4)},
    # Swin-T: wd 1.25e-5 at 2 bits, 3.125e-6 at 3 and 4
    "table7_swint_2bit": {**C1_SWIN, "quantizer.bits": 2, "optim.weights.weight_decay": 1.25e-5},
    "table7_swint_3bit": {**C1_SWIN, "quantizer.bits": 3, "optim.weights.weight_decay": 3.125e-6},
    "table7_swint_4bit": {**C1_SWIN, "quantizer.bits": 4, "optim.weights.weight_decay": 3.125e-6},
    **{f"table7_convnext_{b}bit": {**C1_CONVNEXT, "quantizer.bits": b} for b in (2, 3, 4)},
    **{f"cifar10_preresnet{d}_{b}bit": {**C2_CIFAR, "dataset.name": "cifar10",
                                        "model.name": f"preresnet{d}", "quantizer.bits": b}
       for d in (20, 56) for b in (2, 3, 4)},
    **{f"tableA_preresnet{d}_{b}bit": {**C3_LCQ, "model.name": f"preresnet{d}", "quantizer.bits": b}
       for d in (20, 56) for b in (2, 3, 4)},
    **{f"tableB_preresnet{d}_{b}bit": {**C2_CIFAR, "dataset.name": "cifar100",
                                       "model.name": f"preresnet{d}", "quantizer.bits": b}
       for d in (20, 56) for b in (2, 3, 4)},
    # Table C: nuLSQ-A, 2-bit pre-act ResNet-18; PG as the D-III 2-bit runs, the other AdamW + MSE
    "tableC_preresnet18_2bit_progressive": {**D3_PROGRESSIVE, "model.name": "preresnet18",
                                            "quantizer.name": "nulsq_a", "quantizer.bits": 2},
    "tableC_preresnet18_2bit_adamw_mse": {"model.name": "preresnet18", "quantizer.name": "nulsq_a",
                                          "quantizer.bits": 2, "optim.quant.name": "adamw",
                                          "init.method": "mse"},
    **{f"tableD_preresnet{d}_2bit": {**D3_PROGRESSIVE, "model.name": f"preresnet{d}",
                                     "quantizer.bits": 2} for d in (18, 34)},
    **{f"tableD_preresnet{d}_{b}bit": {**D3_FROM_FP, "model.name": f"preresnet{d}", "quantizer.bits": b,
                                       "optim.weights.weight_decay": D3_WD[b]}
       for d in (18, 34) for b in (3, 4)},
}
TABLE_IDS = {"table1": "1", "table3": "3", "table5": "5", "table7": "7", "cifar10": "CIFAR10",
             "tableA": "A", "tableB": "B", "tableC": "C", "tableD": "D"}


def test_supplement_table_covers_every_experiment():
    assert sorted(SUPPLEMENT) == EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_matches_the_supplement(name):
    cfg = compose_experiment(name)
    assert cfg.table == TABLE_IDS[name.split("_")[0]]
    for key, want in SUPPLEMENT[name].items():
        got = cfg
        for part in key.split("."):
            got = got[part]
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, (key, got, want)


# ---------------------------------------------------------------------------------------------
# Grids: hparams file -> (an experiment it serves, number of jobs, {key: values the paper states})
def multiples(wd: float, factors=(0, 0.5, 1, 2)) -> list[float]:
    return [f * wd for f in factors]


GRIDS = {
    "seeds": ("tableA_preresnet20_3bit", 5, {"trainer.seed": [0, 1, 2, 3, 4]}),
    # C-I: step weight decay in {0, .5, 1, 2} x wd (MobileNetV2)
    "table3_grid": ("table3_mobilenetv2_3bit", 4, {"optim.quant.weight_decay": multiples(6.25e-6)}),
    "table3_4bit_grid": ("table3_mobilenetv2_4bit", 4, {"optim.quant.weight_decay": multiples(1.25e-5)}),
    # C-I: quantizer lr in {1, .1, .01} x 0.004, weight decay in {0, .5, 1, 2} x 5e-5 (ResNet-18)
    "table5_grid": ("table5_resnet18_2bit", 12, {"optim.quant.lr": [0.004, 0.0004, 0.00004],
                                                 "optim.quant.weight_decay": multiples(5e-5)}),
    # C-I: step lr in {1, .1} x 4e-4, weight decay in {0, .5, 1, 2} x wd (Swin-T)
    "table7_swint_grid": ("table7_swint_3bit", 8, {"optim.quant.lr": [4e-4, 4e-5],
                                                   "optim.quant.weight_decay": multiples(3.125e-6)}),
    "table7_swint_2bit_grid": ("table7_swint_2bit", 8, {"optim.quant.lr": [4e-4, 4e-5],
                                                        "optim.quant.weight_decay": multiples(1.25e-5)}),
    # C-II: 4 step lrs x 5 wds x {same, 0} x {plain, Nesterov}, mean of 5 runs each
    "tableB_grid": ("tableB_preresnet56_4bit", 4 * 5 * 2 * 2 * 5, {
        "optim.quant.lr": [4e-2, 4e-3, 4e-4, 4e-5],
        "optim.weights.weight_decay": [1e-4, 2.5e-4, 5e-4, 7.5e-4, 1e-3],
        "optim.weights.nesterov": [False, True]}),
    # C-III: 3 step lrs x 3 wds x {same, 0}, mean of 5 runs each (as C-II)
    "cifar10_grid": ("cifar10_preresnet20_2bit", 3 * 3 * 2 * 5, {
        "optim.quant.lr": [4e-2, 4e-3, 4e-4], "optim.weights.weight_decay": [1e-4, 2.5e-4, 5e-4]}),
}
SEARCH_GRIDS = [g for g in GRIDS if g != "seeds"]


def test_every_grid_file_is_tested():
    names = {p.stem for p in (CONFIG_DIR / "hparams").glob("*.yaml")} - {"none"}
    assert names == set(GRIDS)


def _value(text: str) -> float | bool:
    # the sweeper writes booleans as Python does (True/False)
    return text.lower() == "true" if text.lower() in ("true", "false") else float(text)


def sweep_jobs(experiment: str, grid: str) -> list[list[str]]:
    """The per-job overrides Hydra's basic sweeper makes from the grid's params."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", f"+experiment={experiment}", f"hparams={grid}"],
                      return_hydra_config=True)
    params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    overrides = OverridesParser.create().parse_overrides(params)
    (jobs,) = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    return jobs


def job_config(experiment: str, grid: str, job: list[str]):
    return validate(compose_config([f"+experiment={experiment}", f"hparams={grid}", *job]))


@pytest.mark.parametrize("grid", GRIDS)
def test_grid_sweeps_what_the_supplement_states(grid):
    experiment, count, stated = GRIDS[grid]
    jobs = sweep_jobs(experiment, grid)
    assert len(jobs) == count
    configs = [job_config(experiment, grid, job) for job in (jobs[0], jobs[-1])]
    for key, values in stated.items():
        seen = {_value(o.split("=", 1)[1]) for job in jobs for o in job if o.startswith(key + "=")}
        assert sorted(seen) == pytest.approx(sorted(values)), key
    for cfg in configs:
        assert cfg.experiment == experiment
        if grid in SEARCH_GRIDS:
            # the selection protocol of C-I: 90/10 split of the training set, 15 epochs
            assert cfg.dataset.val_split == 0.1 and cfg.trainer.epochs == 15


@pytest.mark.parametrize("grid, experiment", [("tableB_grid", "tableB_preresnet20_3bit"),
                                              ("cifar10_grid", "cifar10_preresnet56_4bit")])
def test_step_weight_decay_same_or_zero(grid, experiment):
    # C-II / C-III: "the weight decay for step sizes was set to the same value or 0"
    jobs = sweep_jobs(experiment, grid)
    step_wd = {o.split("=", 1)[1] for job in jobs for o in job if o.startswith("optim.quant.weight_decay=")}
    assert len(step_wd) == 2 and "0.0" in step_wd
    same = next(job for job in jobs if "optim.quant.weight_decay=0.0" not in job)
    for job in (same, jobs[-1]):  # the last job sweeps the largest weight decay, not the default
        cfg = job_config(experiment, grid, job)
        assert cfg.optim.quant.weight_decay == cfg.optim.weights.weight_decay > 0
    zero = next(job for job in jobs if "optim.quant.weight_decay=0.0" in job)
    assert job_config(experiment, grid, zero).optim.quant.weight_decay == 0.0


def test_grid_command_line_narrows_the_sweep():
    # a user's own override of a swept key replaces the grid's values (one job per remaining combo)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", "+experiment=table5_resnet18_2bit",
                                           "hparams=table5_grid"], return_hydra_config=True)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()] + ["optim.quant.lr=0.004"]
    (jobs,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
    assert len(jobs) == 4


# ---------------------------------------------------------------------------------------------
# End to end: each experiment through nulsq.train.run, tiny and on the CPU. One bit width per table
# runs every method the table compares; the other bit widths run their default method only.
METHODS: dict[str, list[tuple[str, ...]]] = {
    "table1": [(), ("init=lsq",), ("init=lsq", "optim.quant.name=sgd")],
    "table3": [(), ("quantizer=nulsq_w",), ("quantizer=nulsq_wa",), ("quantizer=lsq",)],
    "table5": [(), ("quantizer=pact",), ("quantizer=apot",), ("quantizer=lsq",), ("quantizer=dorefa",),
               ("quantizer=lqnets",),
               ("quantizer=lcq", "quantizer.weight.args.clip_init=data",
                "quantizer.act.args.clip_init=data")],
    "table7": [(), ("quantizer=lsq",)],
    "cifar10": [(), ("quantizer=nulsq_w",), ("quantizer=nulsq_wa",), ("quantizer=lsq",)],
    "tableA": [(), ("quantizer=lcq_apot_type",)],
    "tableB": [(), ("quantizer=nulsq_w",), ("quantizer=nulsq_wa",), ("quantizer=lsq",)],
    "tableC": [()],
    "tableD": [(), ("quantizer=nulsq_w",)],
}
CROSS_BITS = {"tableD": 3}  # every other table: 2 bits (Table D's 2-bit rows need a 3-bit run)
EXTRA_CASES = [  # commands the headers document beyond `quantizer=`
    # LCQ rows of Table B (the header's `dataset=cifar100 table=B`; synthetic data with 100 classes here)
    ("tableA_preresnet20_2bit", ("dataset.num_classes=100", "table=B")),
    ("tableD_preresnet18_3bit", ("quantizer=lcq",)),                # LCQ* of Table D
]


def _bits(name: str) -> int:
    return int(name.split("bit")[0].rsplit("_", 1)[1])


def e2e_cases() -> list:
    cases = []
    for name in EXPERIMENTS:
        family = name.split("_")[0]
        methods = METHODS[family] if _bits(name) == CROSS_BITS.get(family, 2) else [()]
        cases += [pytest.param(name, m, id=f"{name}-{'-'.join(m) or 'default'}") for m in methods]
    cases += [pytest.param(n, m, id=f"{n}-{'-'.join(m)}") for n, m in EXTRA_CASES]
    return cases


def tiny(name: str, out: Path, *extra: str) -> list[str]:
    """The experiment shrunk to seconds: synthetic 32x32 data, one step, random init, no W&B."""
    return [f"+experiment={name}", "dataset=synthetic", "dataset.num_train=8", "dataset.num_val=4",
            "dataset.batch_size=4", "dataset.image_size=32", "model.input_size=32",
            "model.pretrained=false", "trainer.max_steps=1", "trainer.device=cpu", "init.batches=1",
            "trainer.log_interval=1", f"trainer.output_dir={out}", *extra]




@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, one_thread):
    """Runs an experiment (once per argument set) and returns (run directory, summary)."""
    from nulsq.train import run

    done: dict[tuple, tuple[Path, dict]] = {}

    def get(name: str, *extra: str) -> tuple[Path, dict]:
        if (name, extra) not in done:
            out = tmp_path_factory.mktemp(name)
            if name in PROGRESSIVE and not any(e.startswith("init.from_run=") for e in extra):
                source, _ = get(name.replace("_progressive", "").replace("tableC", "tableD")
                                .replace("_2bit", "_3bit"))
                extra = (*extra, f"init.from_run={source}")
            done[(name, extra)] = (out, run(compose_config(tiny(name, out, *extra))))
        return done[(name, extra)]

    return get


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("name, methods", e2e_cases())
def test_experiment_runs_end_to_end(tiny_runs, name, methods):
    run_dir, summary = tiny_runs(name, *methods)
    assert summary["status"] == "stopped" and summary["steps"] == 1
    assert 0.0 <= summary["top1"] <= 100.0
    assert summary["bits"] == _bits(name) and summary["table"] == (
        "B" if "table=B" in methods else TABLE_IDS[name.split("_")[0]])
    init = next(e for e in _events(run_dir) if e["event"] == "init")
    assert init["method"] == ("progressive" if name in PROGRESSIVE else
                              ("lsq" if "init=lsq" in methods else compose_experiment(name).init.method))


@pytest.mark.slow
def test_progressive_row_without_its_source_run_stops_with_a_clear_error(tmp_path, one_thread):
    from nulsq.train import run

    cfg = compose_config(tiny("tableD_preresnet18_2bit", tmp_path / "run"))
    with pytest.raises(UserError, match="init.from_run"):
        run(cfg)
