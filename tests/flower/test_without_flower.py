"""Flower is an optional extra: the core imports and runs without it; executor=flower says what to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fedtrust.errors import ConfigError
from fedtrust.flower import flower_available, require_flower

NEEDS = "executor=flower needs Flower: pip install 'fedtrust[flower]'"


def test_without_flwr_the_core_runs_and_executor_flower_is_a_one_line_error(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["flwr"] = None  # as if Flower were not installed: `import flwr` raises ImportError
        import fedtrust
        from fedtrust.cli import main
        from fedtrust.registry import names
        assert "flower" in names("executor"), names("executor")
        args = ["data.num_clients=2", "data.clients_per_round=2", "rounds=1", "train.steps=1", "model.width=4"]
        fedtrust.run(None, args + ["executor=sequential", "out={tmp_path / 'run'}"], progress=False, report=False)
        sys.exit(main(["run", "--quiet", "executor=flower", "out={tmp_path / 'flower'}", *args]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: {NEEDS}"
    assert (tmp_path / "run" / "summary.json").is_file() and not (tmp_path / "flower").exists()


def test_require_flower_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr", None)
    assert not flower_available()
    with pytest.raises(ConfigError, match=r"^executor=flower needs Flower: pip install 'fedtrust\[flower\]'$"):
        require_flower()
    from fedtrust.flower.executor import FlowerExecutor

    with pytest.raises(ConfigError, match="needs Flower"):
        FlowerExecutor(None, None, 0, None, 1)  # type: ignore[arg-type]
