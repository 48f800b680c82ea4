"""nulsq: reproduce the nuLSQ paper (ACCV 2024) and the quantizers it compares with, from configs."""

__version__ = "0.1.0"
