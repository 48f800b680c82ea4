"""What every figure shares: readable font sizes, the output formats, an atomic save.

Font sizes are in points: at the 100 dpi of a screen, 8 pt is about 11 pixels, the smallest text
that stays readable without zooming. PNGs are written at 150 dpi, so they stay sharp when a paper
or slide scales them up.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import matplotlib

matplotlib.use("Agg")  # files only: works on headless machines
import matplotlib.pyplot as plt  # noqa: E402

from nulsq.errors import UserError  # noqa: E402
from nulsq.train.checkpoint import atomic_write_bytes  # noqa: E402

FORMATS = ("png", "pdf", "svg")
PNG_DPI = 150
MIN_FONT_PT = 8  # the smallest text any figure may hold
RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "figure.titlesize": 11,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "svg.fonttype": "none",  # text stays text in SVG (editable, searchable)
    "pdf.fonttype": 42,  # TrueType in PDF: journals reject Type 3 fonts
}


@contextmanager
def figure_style() -> Iterator[None]:
    """Draw inside this context: the project's font sizes, leaving the caller's rcParams as they were."""
    with plt.rc_context(RC):
        yield


def output_path(out: Path, fmt: str | None) -> Path:
    """`out` with the suffix of `fmt`; without `fmt`, `out`'s own suffix if it is a format, else PNG.

    Raises:
        UserError: `fmt` is not one of FORMATS.
    """
    out = Path(out)
    if fmt is None:
        fmt = out.suffix.lstrip(".").lower() if out.suffix.lstrip(".").lower() in FORMATS else "png"
    if fmt not in FORMATS:
        raise UserError(f"unknown figure format '{fmt}'; valid: {', '.join(FORMATS)}")
    return out.with_suffix(f".{fmt}")


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Write `fig` to `path` (format from its suffix) atomically, and close it."""
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip("."), dpi=PNG_DPI, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def add_format_argument(parser) -> None:
    """The scripts' --format option."""
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="figure format (default: the --out suffix, else png)")
