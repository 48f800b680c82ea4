"""Select the best setting of a hyperparameter sweep and write the final runs' hparams file.

    python scripts/select.py multirun/table5_resnet18_2bit/2026-01-01_12-00-00
    python scripts/select.py <sweep dir> --seeds 0 1 2 3 4 --hparams-dir configs/hparams

Writes <sweep dir>/selection.md (every setting ranked by mean held-out top-1 over seeds) and, per
(experiment, method), configs/hparams/selected/<experiment>_<method>.yaml, then prints the command
that trains the winner with the final seeds. All the logic is in nulsq/selection.py.
"""

import sys
from pathlib import Path

# This file is named like the standard library's `select` (which subprocess imports), and Python
# puts the folder of the script it runs first on the import path: any script run from scripts/
# would import this file in its place. Then load the real module under its name and stop.
_HERE = Path(__file__).resolve().parent
_path = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if __name__ == "select":
    import importlib.machinery
    import importlib.util

    _spec = importlib.machinery.PathFinder.find_spec("select", _path)
    _real = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_real)
    sys.modules["select"] = _real
else:
    sys.path[:] = _path
    sys.path.insert(0, str(_HERE.parent))
    from nulsq.selection import main, write_selection  # noqa: F401  (write_selection: for tests)

    if __name__ == "__main__":
        sys.exit(main())
