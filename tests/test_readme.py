"""The README stays true: every config key is documented, the set-up commands match .ci/run."""

from pathlib import Path

from fedtrust.registry import get, names
from fedtrust.runner.config import section_fields

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_every_config_key_is_in_the_config_reference():
    missing = [key for key, _, _ in section_fields() if f"`{key}`" not in README]
    assert not missing, f"README config reference lacks {missing}"


def test_ci_runs_exactly_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"```bash\n{ci}\n```" in README


def test_every_registered_component_is_in_the_readme_tables():
    """Every component fedtrust ships (not the test-only ones a test module registers) is documented."""
    for kind in ("algorithm", "partitioner", "model", "attack", "aggregator", "evaluator", "sampler"):
        for name in names(kind):
            if get(kind, name).__module__.startswith("fedtrust."):
                assert f"`{name}`" in README, f"{kind} {name} missing from README"
