"""Run logging: metrics.jsonl always, Weights & Biases optionally (see logger.py), and console
lines through the logging module into train.log (console.py)."""

from nulsq.log.jsonl import read_metrics
from nulsq.log.logger import METRICS_FILE, NullLogger, RunLogger, build_logger
from nulsq.log.quantizer_stats import quantizer_snapshot

__all__ = ["METRICS_FILE", "NullLogger", "RunLogger", "build_logger", "quantizer_snapshot", "read_metrics"]
