"""scripts/make_tables.py and nulsq/results.py on fabricated run directories.

Every expected cell below was worked out by hand from the fabricated top-1 values and the numbers
of supplement Tables A and D, not computed with the module under test.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml

from nulsq.errors import UserError
from nulsq.results import load_paper, load_runs

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "results" / "paper.yaml"


def load_make_tables():
    spec = importlib.util.spec_from_file_location("script_make_tables", ROOT / "scripts" / "make_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(root: Path, name: str, *, table: str | None, model: str, method: str, bits: int,
             seed: int, top1: float, status: str = "finished", val_split: float = 0.0,
             fp_top1: float | None = None, from_run: str | None = None, quant_optim: str = "adamw",
             init: str = "mse", mtime: float | None = None, config: dict | None = None,
             summary: dict | None = None) -> Path:
    """A run directory as nulsq.train.run leaves it (only the files make_tables reads); `config`
    and `summary` are merged into the written files (one level deep)."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config_data = {
        "experiment": name, "table": table,
        "model": {"name": model}, "dataset": {"name": "x", "val_split": val_split},
        "quantizer": {"name": method, "bits": bits},
        "optim": {"weights": {"name": "sgd"}, "quant": {"name": quant_optim}},
        "init": {"method": init, "batches": 100, "from_run": from_run},
        "trainer": {"seed": seed},
    }
    for key, value in (config or {}).items():
        config_data[key] = {**config_data[key], **value} if isinstance(value, dict) else value
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_data))
    summary_data = {"status": status, "top1": top1, "best_top1": top1 + 0.3, "seed": seed,
                    **(summary or {})}
    if fp_top1 is not None:
        summary_data["fp_top1"] = fp_top1
    (run_dir / "summary.json").write_text(json.dumps(summary_data))
    if mtime is not None:
        os.utime(run_dir / "summary.json", (mtime, mtime))
    return run_dir


def section_rows(markdown: str, model: str) -> dict[str, dict[str, str]]:
    """{row label: {column header: cell}} of the table under `## model` (up to the next section)."""
    lines = markdown.splitlines()
    start = lines.index(f"## {model}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    table = [line.strip("|").split("|") for line in lines[start:end] if line.startswith("|")]
    header = [c.strip() for c in table[0]]
    return {cells[0].strip(): dict(zip(header, (c.strip() for c in cells))) for cells in table[2:]}


@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    # Table A, ResNet-20, LCQ 3-bit: three seeds -> mean 92.5333, sample std 0.5508, best 93.1
    for seed, top1 in enumerate([92.0, 92.5, 93.1]):
        fake_run(root, f"a3_s{seed}", table="A", model="preresnet20", method="lcq", bits=3,
                 seed=seed, top1=top1, fp_top1=93.0 + seed * 0.2)
    # must not count: a failed run, a search run on the 90/10 split, a run without a table
    fake_run(root, "a3_failed", table="A", model="preresnet20", method="lcq", bits=3, seed=7,
             top1=10.0, status="failed")
    fake_run(root, "a3_search", table="A", model="preresnet20", method="lcq", bits=3, seed=8,
             top1=10.0, val_split=0.1)
    fake_run(root, "demo", table=None, model="preresnet20", method="nulsq_a", bits=2, seed=0, top1=5.0)
    # Table D, ResNet-18, nuLSQ-A 2-bit: seed 0 twice; only the newer (68.0) counts
    fake_run(root, "d2_old", table="D", model="preresnet18", method="nulsq_a", bits=2, seed=0,
             top1=50.0, mtime=1_000_000)
    fake_run(root, "d2_new", table="D", model="preresnet18", method="nulsq_a", bits=2, seed=0,
             top1=68.0, mtime=2_000_000)
    # Table C rows are recipes: progressive vs AdamW + MSE, both nuLSQ-A
    fake_run(root, "c_pg", table="C", model="preresnet18", method="nulsq_a", bits=2, seed=0,
             top1=66.25, from_run="runs/d3", quant_optim="sgd", init="lsq")
    fake_run(root, "c_adamw", table="C", model="preresnet18", method="nulsq_a", bits=2, seed=0,
             top1=65.5)
    # a table the paper file does not list
    fake_run(tmp_path / "multirun", "z", table="Z", model="resnet18", method="lsq", bits=4, seed=0,
             top1=70.0)
    return tmp_path


def test_load_runs_filters_and_deduplicates(runs):
    records, skipped = load_runs([runs / "runs", runs / "multirun", runs / "absent"])
    assert len(records) == 3 + 1 + 2 + 1
    assert skipped == {"status failed": 1, "search run (val_split > 0)": 1, "no table": 1,
                       "same seed, older run": 1}
    rows_c = sorted(r.row for r in records if r.table == "C")
    assert rows_c == ["adamw+mse", "progressive"]


def test_make_tables_cells(runs, capsys):
    out = runs / "results"
    load_make_tables().main(["--runs", str(runs / "runs"), str(runs / "multirun"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert ("skipped runs: 1 no table, 1 same seed, older run, 1 search run (val_split > 0), "
            "1 status failed") in printed
    expected_files = {f"table{t}.md" for t in ["1", "3", "5", "7", "CIFAR10", "A", "B", "C", "D", "Z"]}
    assert {p.name for p in out.glob("*.md")} == expected_files
    # results/table<id>.png beside the markdown of every table that has a number to draw
    figures = {p.name for p in out.glob("*.png")}
    assert {"tableA.png", "tableCIFAR10.png"} <= figures
    assert {f[:-4] + ".md" for f in figures} <= expected_files and len(list(out.iterdir())) == len(
        expected_files) + len(figures)

    table_a = (out / "tableA.md").read_text()
    r20 = section_rows(table_a, "preresnet20")
    lcq = r20["LCQ (LCQ type at 2 bits)"]
    assert lcq["3-bit ours"] == "92.53 ± 0.55 (n=3)"
    assert lcq["3-bit best"] == "93.10"
    assert lcq["3-bit paper"] == "92.44 ± 0.15, best 92.8"
    assert lcq["3-bit Δ"] == "+0.09"
    assert lcq["2-bit ours"] == "not run" and lcq["2-bit best"] == "" and lcq["2-bit Δ"] == ""
    assert lcq["2-bit paper"] == "90.66 ± 0.08"
    assert r20["LCQ, original paper [13] (FP 93.4 / 94.5)"]["4-bit paper"] == "93.2"
    assert "FP top-1: published 93.49; ours 93.20 (mean of 3 runs' FP evaluation)" in table_a
    r56 = section_rows(table_a, "preresnet56")
    assert r56["LCQ (LCQ type at 2 bits)"]["2-bit paper"] == "91.40 ± 0.20"
    assert r56["LCQ (LCQ type at 2 bits)"]["4-bit paper"] == "94.67 ± 0.14, best 95.0"
    assert r56["LCQ (APoT type at 2 bits)"]["3-bit paper"] == ""

    table_d = section_rows((out / "tableD.md").read_text(), "preresnet18")
    nulsq_a = table_d["† nuLSQ-A"]
    assert (nulsq_a["2-bit ours"], nulsq_a["2-bit best"], nulsq_a["2-bit paper"], nulsq_a["2-bit Δ"]) == (
        "68.00 (n=1)", "68.00", "67.9", "+0.10")
    assert table_d["LLT [12]"]["2-bit paper"] == "66.0" and table_d["PACT [4]"]["4-bit ours"] == "not run"

    table_c = section_rows((out / "tableC.md").read_text(), "preresnet18")
    assert table_c["progressive fine-tuning (PG)"]["2-bit ours"] == "66.25 (n=1)"
    assert table_c["AdamW + MSE init"]["2-bit ours"] == "65.50 (n=1)"
    assert table_c["AdamW + MSE init"]["2-bit paper"] == "" == table_c["AdamW + MSE init"]["2-bit Δ"]

    table_b = section_rows((out / "tableB.md").read_text(), "preresnet56")
    assert table_b["nuLSQ-WA"]["4-bit ours"] == "not run" and table_b["nuLSQ-WA"]["4-bit paper"] == ""

    table_z = (out / "tableZ.md").read_text()
    assert table_z.startswith("# Table Z (not in results/paper.yaml)")
    z = section_rows(table_z, "resnet18")["lsq"]
    assert list(z) == ["method", "4-bit ours", "4-bit best", "4-bit paper", "4-bit Δ"]
    assert z["4-bit ours"] == "70.00 (n=1)" and z["4-bit paper"] == ""


def test_negative_difference_and_rounding(tmp_path):
    # Table D ResNet-18 LSQ 3-bit, published 70.2: ours 70.0 and 70.1 -> mean 70.05, Δ -0.15;
    # sample std of {70.0, 70.1} = 0.1 / sqrt(2) = 0.0707
    for seed, top1 in enumerate([70.0, 70.1]):
        fake_run(tmp_path / "runs", f"s{seed}", table="D", model="preresnet18", method="lsq",
                 bits=3, seed=seed, top1=top1)
    load_make_tables().main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    lsq = section_rows((tmp_path / "out" / "tableD.md").read_text(), "preresnet18")["† LSQ [5]"]
    assert lsq["3-bit ours"] == "70.05 ± 0.07 (n=2)"
    assert lsq["3-bit Δ"] == "-0.15"


def test_paper_file_holds_the_supplement_numbers():
    paper = load_paper(PAPER)
    a20 = paper["A"]["rows"]["preresnet20"]
    assert a20["lcq_apot_type"][2] == {"mean": 90.94, "std": 0.38, "best": 91.4}
    assert a20["lcq_original"] == {2: 91.8, 3: 92.8, 4: 93.2}
    a56 = paper["A"]["rows"]["preresnet56"]
    assert a56["lcq"][3] == {"mean": 94.54, "std": 0.18, "best": 94.9}
    assert a56["lcq_original"] == {2: 93.5, 3: 94.6, 4: 94.7}
    d18 = paper["D"]["rows"]["preresnet18"]
    assert d18["nulsq_a"] == {2: 67.9, 3: 70.7, 4: 71.5}
    assert d18["lcq"] == {2: 66.2, 3: 70.4, 4: 71.4}
    assert paper["D"]["fp"]["preresnet18"] == 71.6
    # tables whose numbers are not in the supplement text: every published cell empty
    for table in ("1", "3", "5", "7", "B", "C"):
        cells = [c for rows in paper[table]["rows"].values() for r in rows.values() for c in r.values()]
        assert cells and all(c is None for c in cells), table


def test_missing_paper_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="published numbers file not found: .*nope.yaml"):
        load_paper(tmp_path / "nope.yaml")


# -- provenance: settings never average, smoke runs stay out, each cell names its runs ------------
def test_settings_never_average_and_each_cell_names_its_runs(tmp_path):
    root = tmp_path / "runs"
    code = {"commit": "0123456789abcdef", "dirty": False}
    # Table D ResNet-18 LSQ 4-bit: two seeds at lr 0.01 (the cell), one seed at lr 0.1 (listed apart)
    for seed, top1 in enumerate([71.0, 71.4]):
        fake_run(root, f"lr01_s{seed}", table="D", model="preresnet18", method="lsq", bits=4,
                 seed=seed, top1=top1, config={"optim": {"weights": {"name": "sgd", "lr": 0.01}}},
                 summary={"code": code})
    fake_run(root, "lr1_s0", table="D", model="preresnet18", method="lsq", bits=4, seed=0, top1=50.0,
             config={"optim": {"weights": {"name": "sgd", "lr": 0.1}}},
             summary={"code": {"commit": "fedcba9876543210", "dirty": True}})
    # same config, another trainer protocol (recorded in summary.json): another setting as well
    fake_run(root, "proto_s0", table="D", model="preresnet18", method="lsq", bits=4, seed=0, top1=1.0,
             config={"optim": {"weights": {"name": "sgd", "lr": 0.01}}},
             summary={"protocol": {"init": "fp_eval"}})
    records, skipped = load_runs([root])
    assert len(records) == 4 and not skipped  # seed 0 of three settings: none replaces another
    load_make_tables().main(["--runs", str(root), "--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "tableD.md").read_text()
    lsq = section_rows(text, "preresnet18")["† LSQ [5]"]
    assert lsq["4-bit ours"] == "71.20 ± 0.28 (n=2)"  # mean of 71.0 and 71.4, not of all four
    cell_line = next(line for line in text.splitlines() if line.startswith("- † LSQ [5], 4-bit: "))
    assert "code 0123456" in cell_line and "lr01_s0 (seed 0, 71.00)" in cell_line
    assert "lr01_s1 (seed 1, 71.40)" in cell_line and "lr1_s0" not in cell_line
    others = [line for line in text.splitlines() if line.startswith("  - not in the table")]
    assert len(others) == 2
    assert any("50.00 (n=1)" in line and "code fedcba9+dirty" in line and "lr1_s0" in line
               for line in others)
    assert any("1.00 (n=1)" in line and "protocol init=fp_eval, code unknown" in line for line in others)


def test_smoke_runs_are_skipped(tmp_path):
    root = tmp_path / "runs"
    a = {"experiment": "tableA_preresnet20_2bit"}  # its experiment file trains 300 epochs
    fake_run(root, "full", table="A", model="preresnet20", method="lcq", bits=2, seed=0, top1=90.5,
             config={**a, "trainer": {"seed": 0, "epochs": 300}})
    fake_run(root, "short", table="A", model="preresnet20", method="lcq", bits=2, seed=1, top1=10.0,
             config={**a, "trainer": {"seed": 1, "epochs": 1}})
    fake_run(root, "steps", table="A", model="preresnet20", method="lcq", bits=2, seed=2, top1=11.0,
             config={**a, "trainer": {"seed": 2, "epochs": 300, "max_steps": 5}})
    fake_run(root, "synth", table="A", model="preresnet20", method="lcq", bits=2, seed=0, top1=12.0,
             config={**a, "trainer": {"seed": 0, "epochs": 300}, "dataset": {"name": "synthetic"}})
    records, skipped = load_runs([root])
    assert [r.top1 for r in records] == [90.5]
    assert skipped == {"smoke run (fewer epochs than its experiment)": 1,
                       "smoke run (trainer.max_steps)": 1, "smoke run (synthetic data)": 1}
