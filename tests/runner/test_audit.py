"""``fedtrust audit``: the gradient-leakage audit of a finished run or of a config's initial model.

Runs are real (bundled digits, the sigmoid ConvNet5 whose gradients DLG inverts, 4 clients, 1 round); the
attack is DLG with few L-BFGS steps, enough on 8x8 digits to reconstruct an undefended gradient to >100 dB.
Numbers are checked against what they must be: the probed samples are the clients' training samples, the
privacy row's δ is the run's own clip+noise applied to −η·g, the update target's batch is B samples.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import fedtrust
from fedtrust.cli import main
from fedtrust.errors import ConfigError, FedTrustError
from fedtrust.report import write_report
from fedtrust.runner.audit import AuditSettings, audit_run, write_audit
from fedtrust.runner.federation import build_federation
from fedtrust.runner.config import build_config, load_yaml

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]

BASE = ["model.name=convnet5", "rounds=1", "data.num_clients=4", "data.clients_per_round=2", "train.steps=3",
        "eval.personalized=false"]
QUICK = AuditSettings(num_clients=1, samples=1, sigmas=(1e-4, 1e-1), iterations=5, restarts=1)


def _run(out: Path, *extra: str) -> Path:
    return fedtrust.run(None, [*BASE, *extra, f"out={out}"], progress=False, report=False).run_dir


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("audit") / "plain")


@pytest.fixture(scope="module")
def private_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("audit") / "private", "privacy.clip=0.01", "privacy.noise=0.5")


def _rows(result, defense: str) -> list:
    return [r for r in result.rows if r.defense == defense]


def test_audit_of_a_finished_run_reconstructs_an_undefended_gradient(plain_run: Path) -> None:
    """Round 1's server model, client 0's first training sample: without a defense DLG recovers the image
    (PSNR > 100 dB, SSIM 1); more noise gives a larger I_lb and a worse reconstruction."""
    result = audit_run(plain_run, QUICK)
    fed = build_federation(build_config(load_yaml(plain_run / "config.yaml")))
    assert result.round == 1
    assert [r.defense for r in result.rows] == ["none", "noise 0.0001", "noise 0.1"]
    assert {(r.client, tuple(r.samples)) for r in result.rows} == {(0, (int(fed.data.indices[0][0]),))}
    first = fed.data.indices[0][0]
    assert result.rows[0].labels == [int(fed.dataset.train.y[first])]
    none, small, big = result.rows
    assert none.i2f_lb == 0 and none.psnr > 100 and none.ssim > 0.999
    assert 0 < small.i2f_lb < big.i2f_lb
    assert small.l2_error < big.l2_error and small.psnr > big.psnr
    assert big.lambda_max == pytest.approx(small.lambda_max, rel=1e-6)  # same sample, same J
    pixels = fed.dataset.train.x[first].double() / 255
    assert np.allclose(result.originals[0][0], pixels.numpy(), atol=1e-6)


def test_audit_writes_json_table_and_reconstructions(plain_run: Path, tmp_path: Path) -> None:
    result = audit_run(plain_run, QUICK, out=tmp_path)
    folder = write_audit(result)
    data = json.loads((folder / "audit.json").read_text())
    assert data["round"] == 1 and len(data["rows"]) == 3
    assert data["settings"]["sigmas"] == [1e-4, 1e-1]
    table = (folder / "audit.md").read_text().splitlines()
    assert sum(line.startswith("| 0 |") for line in table) == 3
    with np.load(folder / "reconstructions.npz") as npz:
        assert sorted(npz.files) == ["x0_0", "x0_1", "x0_2", "xhat_0", "xhat_1", "xhat_2"]
        assert npz["xhat_2"].shape == (1, 1, 8, 8)
        assert npz["xhat_2"].min() >= 0 and npz["xhat_2"].max() <= 1
    assert not list(folder.glob("*.tmp*"))


def test_privacy_row_is_the_runs_own_defense(private_run: Path, plain_run: Path) -> None:
    """A run with privacy.clip/noise gets a 'privacy' row: the shared update is clipped to 0.01 and noised, so
    the attacker's target is far from g0 (I_lb > 0, no perfect reconstruction); a run without gets none."""
    settings = AuditSettings(num_clients=1, samples=1, sigmas=(1e-3,), iterations=5, restarts=1)
    private = audit_run(private_run, settings)
    assert [r.defense for r in private.rows] == ["none", "privacy", "noise 0.001"]
    row = _rows(private, "privacy")[0]
    assert row.i2f_lb > 0 and row.psnr < _rows(private, "none")[0].psnr
    assert not _rows(audit_run(plain_run, settings), "privacy")


def test_update_target_batches_b_samples(plain_run: Path) -> None:
    """--target update: one row per defense on the client's first B = 2 samples (FedAvg update of S = 2
    steps), two labels, a reconstruction of shape (2, 1, 8, 8)."""
    settings = AuditSettings(clients=(1,), samples=2, target="update", steps=2, sigmas=(1e-3,), iterations=3,
                             restarts=1)
    result = audit_run(plain_run, settings)
    fed = build_federation(build_config(load_yaml(plain_run / "config.yaml")))
    assert [r.defense for r in result.rows] == ["none", "noise 0.001"]
    assert all(r.client == 1 and r.samples == [int(i) for i in fed.data.indices[1][:2]] for r in result.rows)
    assert all(r.target == "update" and len(r.labels) == 2 for r in result.rows)
    assert result.reconstructions[0].shape == (2, 1, 8, 8)


def test_config_is_audited_at_its_initial_model(tmp_path: Path) -> None:
    """A config file: round 0, the fresh model the config builds; overrides apply; init_from is refused."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": "convnet5"}, "data": {"num_clients": 4}}))
    result = audit_run(config, AuditSettings(num_clients=1, samples=1, attack="none"), ["data.clients_per_round=2"],
                       out=tmp_path / "out")
    assert result.round == 0 and result.run_dir == tmp_path / "out"
    assert [r.psnr for r in result.rows] == [None, None]  # attack none: I_lb only
    assert result.rows[1].i2f_lb > 0
    with pytest.raises(ConfigError, match="init_from"):
        audit_run(config, AuditSettings(attack="none"), ["data.clients_per_round=2", f"init_from={tmp_path}"])


def test_audit_errors_are_one_line(plain_run: Path, tmp_path: Path) -> None:
    with pytest.raises(FedTrustError, match="neither a run directory nor a config file"):
        audit_run(tmp_path / "missing")
    with pytest.raises(FedTrustError, match="not a run directory"):
        audit_run(tmp_path)
    with pytest.raises(ConfigError, match=r"client 9 does not exist; expected ids in 0\.\.3"):
        audit_run(plain_run, AuditSettings(clients=(9,), attack="none"))
    with pytest.raises(ConfigError, match="overrides apply to a CONFIG.yaml only"):
        audit_run(plain_run, AuditSettings(attack="none"), ["rounds=3"])
    for bad, match in ((dict(sigmas=(0.0,)), "sigmas must be finite and > 0"), (dict(samples=0), "samples must be"),
                       (dict(attack="gan"), "attack must be one of"), (dict(target="model"), "target must be one of")):
        with pytest.raises(ConfigError, match=match):
            AuditSettings(**bad)


def test_cli_writes_the_audit_and_the_report_privacy_section(plain_run: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(plain_run, run_dir)
    rc = main(["audit", str(run_dir), "--num-clients", "1", "--samples", "1", "--sigma", "1e-3",
               "--iterations", "3", "--restarts", "1", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and f"audit: {run_dir / 'audit'}" in out
    assert (run_dir / "audit" / "audit.json").is_file()
    html = (run_dir / "report.html").read_text()
    assert "<h2>Privacy</h2>" in html and "Audit: reconstructions" in html and "noise 0.001" in html


@pytest.mark.parametrize("argv, message", [
    (["--sigma", "abc"], "--sigma must be a comma-separated list of numbers, got 'abc'"),
    (["--sigma", "-1"], "audit sigmas must be finite and > 0"),
    (["--clients", "7"], "audit client 7 does not exist"),
    (["--samples", "0"], "audit samples must be >= 1"),
])
def test_cli_errors_are_one_line(plain_run: Path, capsys, argv: list[str], message: str) -> None:
    assert main(["audit", str(plain_run), "--attack", "none", "--no-report", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (plain_run / "audit").exists()


def test_damaged_audit_is_a_report_note(plain_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(plain_run, run_dir)
    (run_dir / "audit").mkdir()
    (run_dir / "audit" / "audit.json").write_text("{not json")
    html = write_report([run_dir]).read_text()
    assert "audit.json could not be read" in html and "<h2>Privacy</h2>" not in html
