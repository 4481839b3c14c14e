"""The deployable app: config <-> Flower run config, `fedtrust flower-app`, and the node's client id."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower not installed: pip install 'fedtrust[flower]'")

import tomli  # noqa: E402  (a Flower dependency)
from flwr.common.config import flatten_dict, validate_config  # noqa: E402

from fedtrust.cli import main  # noqa: E402
from fedtrust.errors import ConfigError  # noqa: E402
from fedtrust.flower.app_config import (  # noqa: E402
    FlowerSettings, config_from_run_config, config_table, flatten,
)
from fedtrust.flower.client_app import node_client  # noqa: E402
from fedtrust.runner.config import build_config, config_to_dict  # noqa: E402

SMALL = ["data.num_clients=2", "data.clients_per_round=2"]


def test_config_survives_the_run_config_including_none_lists_and_yaml_like_strings():
    cfg = build_config({"model": {"name": "cnn", "norm": "none"}},
                       SMALL + ["train.betas=[0.8, 0.95]", "data.root='on'", "out=runs/x y"])
    table = config_table(cfg)
    assert table["fedtrust"]["train"]["steps"] == "null"
    assert table["fedtrust"]["data"]["root"] == '"on"'  # YAML would read a bare on as True
    run_config = flatten_dict(table)  # what Flower hands the apps
    assert config_to_dict(config_from_run_config(run_config)) == config_to_dict(cfg)


def test_run_config_overrides_read_like_cli_overrides():
    run_config = flatten(config_table(build_config({}, SMALL)))
    run_config.update({"fedtrust.rounds": 7, "fedtrust.data.alpha": "0.1", "fedtrust.train.betas": "[0.5, 0.6]"})
    cfg = config_from_run_config(run_config, ["executor=flower"])
    assert (cfg.rounds, cfg.data.alpha, cfg.train.betas, cfg.executor) == (7, 0.1, (0.5, 0.6), "flower")
    with pytest.raises(ConfigError, match="unknown config key 'data.alpa'"):
        config_from_run_config({**run_config, "fedtrust.data.alpa": 1})
    with pytest.raises(ConfigError, match="holds no 'fedtrust.\\*' keys"):
        config_from_run_config({"num-server-rounds": 3})


def test_flower_settings_are_validated():
    assert FlowerSettings.from_run_config({"flower.round-timeout": 5}) == FlowerSettings(round_timeout=5.0)
    with pytest.raises(ConfigError, match="'flower.join-timeout' must be a number of seconds > 0"):
        FlowerSettings.from_run_config({"flower.join-timeout": 0})
    with pytest.raises(ConfigError, match="unknown run-config key 'flower.timeout'; valid: flower.round-timeout"):
        FlowerSettings.from_run_config({"flower.timeout": 1})


def test_flower_app_command_writes_a_valid_flower_app(tmp_path, capsys):
    out = tmp_path / "app"
    assert main(["flower-app", "configs/fedavg-digits.yaml", str(out), "rounds=3", *SMALL]) == 0
    assert str(out) in capsys.readouterr().out
    pyproject = tomli.loads((out / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(pyproject, check_module=True, project_dir=out)
    assert ok, errors
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedtrust.flower.app:server_app",
                                 "clientapp": "fedtrust.flower.app:client_app"}
    cfg = config_from_run_config(flatten_dict(app["config"]))
    assert (cfg.executor, cfg.rounds, cfg.data.num_clients) == ("flower", 3, 2)
    assert "partition-id=0 num-partitions=2" in (out / "README.md").read_text()
    assert main(["flower-app", "configs/fedavg-digits.yaml", str(out), *SMALL]) == 2  # never overwrites


def test_components_load_as_flower_apps():
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from fedtrust.flower import app

    assert isinstance(app.server_app, ServerApp) and isinstance(app.client_app, ClientApp)


@pytest.mark.parametrize(("node_config", "error"), [
    ({}, "SuperNode has no node-config 'partition-id'"),
    ({"partition-id": 2, "num-partitions": 2}, r"partition-id=2 must be an int in 0..1"),
    ({"partition-id": 0, "num-partitions": 3}, "num-partitions=3 differs from data.num_clients=2"),
])
def test_node_client_errors_name_the_node_config_key(node_config, error):
    with pytest.raises(ConfigError, match=error):
        node_client(node_config, 2)
    assert node_client({"partition-id": 1, "num-partitions": 2}, 2) == 1


def test_readme_deployment_block_is_the_generated_one():
    """The README's deployment steps are :func:`deployment_steps`' output, byte for byte (regenerate the block
    with it when the steps change): the steps tests/flower/test_deployment.py runs from the README are the
    ones every app's README shows."""
    from fedtrust.flower.deployment import README_BEGIN, README_END, deployment_steps

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme[readme.index(README_BEGIN) + len(README_BEGIN):readme.index(README_END)]
    assert block == f"\n```bash\n{deployment_steps()}```\n"


def test_app_readme_has_the_steps_for_its_client_count(tmp_path):
    """An app for 3 clients: three keys, three SuperNodes on three ports, partitions 0-2 of 3, `flwr run` of the
    app's own directory, and no step that writes the app again."""
    from fedtrust.flower.deployment import deployment_steps

    out = tmp_path / "myapp"
    assert main(["flower-app", "configs/fedavg-digits.yaml", str(out), "data.num_clients=3",
                 "data.clients_per_round=3"]) == 0
    text = (out / "README.md").read_text()
    assert deployment_steps(3, app="myapp", config=None) in text
    assert "--nodes 3" in text and "certs/node2.pub" in text and "partition-id=2 num-partitions=3" in text
    assert "--port 9096" in text and "flwr run myapp my-link" in text and "\nfedtrust flower-app " not in text
