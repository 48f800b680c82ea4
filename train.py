"""Train (and quantize) a network as the composed Hydra config says.

    python train.py                                    # the embedded demo: digits, FP then nuLSQ-A 2-bit
    python train.py +experiment=table5_resnet18_2bit   # one row of a paper table
    python train.py +experiment=X hparams=X_grid       # the paper's grid (a multirun by itself)
    torchrun --nproc_per_node=8 train.py +experiment=tableD_preresnet34_3bit
"""

import os
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from nulsq.cli import check_group_choices, preflight_command_line, rank_overrides, report_user_errors
from nulsq.config import register_schema

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# configs/hydra/launcher/submitit_slurm.yaml shares its name with the plugin's schema, so Hydra
# validates it against that schema (wanted: a mistyped launcher key fails) and warns that this
# matching is deprecated; the file lists every key, so it keeps working without the schema.
warnings.filterwarnings("ignore", message=r"(?s).*validated against ConfigStore schema")

register_schema()


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from nulsq.sweep import run_job  # after Hydra has parsed, so `--help` stays fast
    from nulsq.train import run

    # In a multirun a failing job is recorded and the sweep goes on (nulsq/sweep.py).
    summary = run_job(lambda: run(cfg))
    return summary.get("top1")  # the value a Hydra sweeper optimises


if __name__ == "__main__":
    # Before Hydra parses: an unknown group option is one line, and torchrun ranks > 0 keep
    # their Hydra output out of the run directories.
    report_user_errors(lambda: check_group_choices(sys.argv[1:], CONFIG_DIR))
    # Every config mistake before Hydra makes a run directory (run() checks again, for the API).
    report_user_errors(lambda: preflight_command_line(sys.argv[1:], CONFIG_DIR))
    sys.argv = rank_overrides(sys.argv, os.environ)
    main()
    if "nulsq.sweep" in sys.modules:  # a multirun whose jobs failed exits 1 after its last line
        sys.exit(sys.modules["nulsq.sweep"].exit_status())
