"""The trainer: `run(cfg)` and the pieces it is made of."""

from nulsq.train.run import run

__all__ = ["run"]
