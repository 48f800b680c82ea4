"""Score a trained checkpoint again: top-1/top-5 on its run's evaluation split.

    python eval.py runs/<experiment>/<run>               # the run's checkpoints/last.pt
    python eval.py path/to/last.pt --data-root /data --batch-size 512 --device cuda

The model, its quantizers and the data are rebuilt from the config stored in the checkpoint, by the
trainer's own code (nulsq/evaluation.py); the result is printed and written to eval.json beside
the checkpoint. A mistake is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nulsq.cli import report_user_errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint file or a run directory")
    parser.add_argument("--data-root", help="another dataset.root (default: the run's)")
    parser.add_argument("--batch-size", type=int, help="evaluation batch size (default: the run's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the run's trainer.device")
    parser.add_argument("--out", type=Path, help="where to write the JSON (default: eval.json beside it)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="read a checkpoint written by nulsq before its safe format (numpy arrays "
                             "allowed, never code)")
    args = parser.parse_args(argv)

    from nulsq.evaluation import evaluate_checkpoint  # after parsing, so --help stays fast

    result, out = report_user_errors(lambda: evaluate_checkpoint(
        args.checkpoint, args.data_root, args.batch_size, args.device, args.trust_checkpoint, args.out))
    print(f"{result['checkpoint']}: {result['model']} {result['method']} {result['bits']}-bit, "
          f"{result['dataset']} {result['split']}: top-1 {result['top1']:.2f}% "
          f"top-5 {result['top5']:.2f}% (loss {result['loss']:.4f}, {result['device']})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
