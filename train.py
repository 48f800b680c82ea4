"""Train (and quantize) a network as the composed Hydra config says.

    python train.py                                    # the embedded demo: digits, FP then nuLSQ-A 2-bit
    python train.py +experiment=table5_resnet18_2bit   # one row of a paper table
    python train.py -m +experiment=X hparams=X_grid    # the paper's grid (Hydra multirun)
    torchrun --nproc_per_node=8 train.py +experiment=tableD_preresnet34_3bit
"""

import hydra
from omegaconf import DictConfig

from nulsq.cli import report_user_errors
from nulsq.config import register_schema

register_schema()


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from nulsq.train import run  # after Hydra has parsed, so `--help` stays fast

    summary = report_user_errors(lambda: run(cfg))
    return summary.get("top1")  # the value a Hydra sweeper optimises


if __name__ == "__main__":
    main()
