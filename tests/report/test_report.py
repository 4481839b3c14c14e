"""Tests for fedtrust.report: loading run directories and writing the HTML + PNG report.

The fake runs mimic what the runner writes: run "alpha" finished (summary.json,
a NaN in class_acc, a null client), run "beta" was killed (no summary.json,
a truncated last line of metrics.jsonl, three predictors).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import yaml

from fedtrust.errors import FedTrustError
from fedtrust.report import default_report_path, load_run, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUM_CLASSES = 10
NUM_CLIENTS = 6
CLASS_COUNTS = [500, 300, 180, 110, 70, 40, 25, 15, 10, 5]
GROUPS = {"many": [0, 1, 2], "medium": [3, 4, 5, 6], "few": [7, 8, 9]}
HMT = {"head": [0, 1, 2], "middle": [3, 4, 5], "tail": [6, 7, 8, 9]}


# --- fake run directories ------------------------------------------------------


def _config(algorithm: str, rounds: int) -> dict:
    return {
        "seed": 0, "rounds": rounds, "executor": "sequential",
        "algorithm": {"name": algorithm, "lr": 0.05},
        "data": {"dataset": "digits", "num_clients": NUM_CLIENTS, "partition": "dirichlet", "alpha": 0.5},
        "model": {"name": "cnn"}, "train": {"local_epochs": 1, "batch_size": 32}, "eval": {"every": 2},
    }


def _partition() -> dict:
    hist = [[(c * 7 + k * 13) % 40 + (5 if c == k % NUM_CLASSES else 0) for c in range(NUM_CLASSES)]
            for k in range(NUM_CLIENTS)]
    return {
        "num_clients": NUM_CLIENTS, "num_classes": NUM_CLASSES, "sizes": [sum(r) for r in hist],
        "label_hist": hist, "class_counts": CLASS_COUNTS, "groups": GROUPS, "hmt": HMT,
        "partition": "dirichlet", "params": {"alpha": 0.5},
    }


def _eval_keys(acc: float) -> dict:
    """Eval keys of one predictor; class_acc has a NaN (written as null), client 3 has no test set."""
    class_acc = [min(1.0, acc + 0.1 - 0.02 * c) for c in range(NUM_CLASSES)]
    class_acc[9] = None
    client_acc = [acc - 0.05 + 0.02 * k for k in range(NUM_CLIENTS)]
    client_acc[3] = None
    known = [a for a in client_acc if a is not None]
    return {
        "test_acc": acc, "test_loss": 1.0 - acc, "class_acc": class_acc,
        "group_acc": {"many": acc + 0.05, "medium": acc - 0.05, "few": None},
        "hmt_acc": {"head": acc + 0.06, "middle": acc, "tail": acc - 0.2},
        "client_acc": client_acc, "client_acc_mean": sum(known) / len(known),
    }


def _records(final_acc: float, rounds: int, predictors: list[str] | None) -> list[dict]:
    records = []
    for rnd in range(1, rounds + 1):
        record: dict = {"round": rnd, "time_s": 1.5 * rnd, "train_loss": 2.3 / rnd}
        if rnd % 2 == 0:
            acc = final_acc - 0.04 * (rounds - rnd) / 2
            record.update(_eval_keys(acc))
            if predictors:
                record["by_predictor"] = {p: _eval_keys(acc - 0.03 * i) for i, p in enumerate(predictors)}
            record["ood"] = {"textures": {"auroc": 0.81, "fpr95": 0.52}}  # a key the report does not require
        records.append(record)
    records[0]["train_loss"] = None
    return records


def make_run(root: Path, name: str, algorithm: str, final_acc: float, *, finished: bool,
             predictors: list[str] | None = None) -> Path:
    """A run directory like the runner's; an unfinished run lacks summary.json and ends mid-line."""
    run = root / name
    run.mkdir(parents=True)
    rounds = 6
    (run / "config.yaml").write_text(yaml.safe_dump(_config(algorithm, rounds)))
    (run / "partition.json").write_text(json.dumps(_partition()))
    records = _records(final_acc, rounds, predictors)
    lines = [json.dumps(r) for r in records]
    if not finished:
        lines.append('{"round": 7, "time_s": 10.5, "train_lo')  # killed while writing
    (run / "metrics.jsonl").write_text("\n".join(lines) + ("\n" if finished else ""))
    if finished:
        summary = {k: v for k, v in records[-1].items() if k not in ("round", "time_s", "train_loss")}
        summary.update(rounds=rounds, wall_time_s=12.25, executor="sequential", algorithm=algorithm,
                       dataset="digits")
        (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    alpha = make_run(root, "alpha", "fedavg", 0.8731, finished=True)
    beta = make_run(root, "beta", "fedloge", 0.9012, finished=False,
                    predictors=["universal", "global", "personalized"])
    return alpha, beta


# --- helpers -------------------------------------------------------------------


def inline_pngs(page: str) -> list[bytes]:
    """The decoded bytes of every inlined image."""
    return [base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


# --- loading -------------------------------------------------------------------


def test_load_run_skips_truncated_line_and_nulls(runs: tuple[Path, Path]) -> None:
    beta = load_run(runs[1])
    assert len(beta.records) == 6
    assert any("skipped 1 unreadable line" in note for note in beta.notes)
    assert any("summary.json is missing" in note for note in beta.notes)
    assert beta.final_list("class_acc")[9] is None
    assert beta.final_list("client_acc")[3] is None
    assert beta.final_value("test_acc") == pytest.approx(0.9012)
    assert beta.best == (pytest.approx(0.9012), 6)
    assert beta.predictors == ["universal", "global", "personalized"]
    recorded = beta.wall_time_s  # read from the fake summary file, not measured
    assert beta.rounds_done == 6 and recorded == pytest.approx(9.0)
    assert beta.series("train_loss")[0] == [2, 3, 4, 5, 6]  # round 1's null loss is skipped
    assert beta.label == "beta (fedloge)"
    assert beta.partition_name == "dirichlet (alpha=0.5)"


def test_default_report_paths(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert default_report_path([a]) == a.resolve() / "report.html"
    assert default_report_path([a, b]) == tmp_path.resolve() / "report-2runs.html"


# --- reports ---------------------------------------------------------------------


def test_single_run_report(runs: tuple[Path, Path]) -> None:
    alpha = runs[0]
    out = write_report([alpha])
    assert out == alpha.resolve() / "report.html" and out.is_file()
    page = out.read_text(encoding="utf-8")
    assert "alpha" in page and "fedavg" in page and "digits" in page
    assert "87.31%" in page  # final test accuracy
    assert "12.2 s" in page  # the summary's recorded run time, formatted
    assert "<link" not in page and "<script" not in page  # self-contained
    pngs = inline_pngs(page)
    assert len(pngs) == 4  # curves, client accuracy, class groups, partition
    assert page.count('<img src="data:image/png;base64,') == len(pngs)
    assert all(png.startswith(PNG_MAGIC) for png in pngs)
    files = sorted((alpha / "report_files").glob("report-*.png"))
    assert len(files) == 4
    assert {f.read_bytes() for f in files} == set(pngs)


def test_two_run_report(runs: tuple[Path, Path]) -> None:
    alpha, beta = runs
    out = write_report([alpha, beta])
    assert out == alpha.parent.resolve() / "report-2runs.html"
    page = out.read_text(encoding="utf-8")
    for text in ("alpha (fedavg)", "beta (fedloge)", "87.31%", "90.12%", "personalized", "textures"):
        assert text in page
    assert "skipped 1 unreadable line" in page  # the killed run's truncated line is reported
    pngs = inline_pngs(page)
    assert len(pngs) == 4  # the runs share one partition, drawn once
    assert all(png.startswith(PNG_MAGIC) for png in pngs)
    files = list((alpha.parent / "report_files").glob("report-2runs-*.png"))
    assert len(files) == len(pngs)


def test_config_only_run_says_metrics_missing(tmp_path: Path) -> None:
    run = tmp_path / "killed"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(_config("fedavg", 10)))
    page = write_report([run]).read_text(encoding="utf-8")
    assert "metrics.jsonl is missing" in page
    assert "partition.json is missing" in page
    assert "killed" in page and "0 / 10" in page
    assert "data:image/png" not in page


def test_empty_and_broken_files_render(tmp_path: Path) -> None:
    run = tmp_path / "broken"
    run.mkdir()
    (run / "config.yaml").write_text("seed: [unclosed\n")
    (run / "metrics.jsonl").write_text('{"round": 1, "time_s": 0.5, "train_loss": 2.1}\n[1, 2]\n')
    (run / "summary.json").write_text("42")
    page = write_report([run], tmp_path / "out" / "r.html").read_text(encoding="utf-8")
    assert "config.yaml is not valid YAML" in page
    assert "summary.json does not hold a mapping" in page
    assert "no evaluation round yet" in page
    assert (tmp_path / "out" / "report_files" / "r-curves.png").read_bytes().startswith(PNG_MAGIC)


def test_strings_from_files_are_escaped(tmp_path: Path) -> None:
    run = tmp_path / "evil"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(_config("<script>alert(1)</script>", 4)))
    page = write_report([run]).read_text(encoding="utf-8")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_bad_arguments_raise_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(FedTrustError, match="at least one run"):
        write_report([])
    with pytest.raises(FedTrustError, match="does not exist"):
        write_report([tmp_path / "nope"])
