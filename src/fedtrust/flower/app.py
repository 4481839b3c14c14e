"""A deployable Flower app built from a fedtrust config.

``server_app`` and ``client_app`` below are what ``flwr run`` loads (an app's
``[tool.flwr.app.components]`` point here); both read the fedtrust config from
the run config. :func:`write_app` writes such an app directory for a config
(``fedtrust flower-app CONFIG OUTDIR``): a ``pyproject.toml`` whose
``[tool.flwr.app.config]`` carries the resolved config under ``fedtrust.*``
(with ``executor = "flower"``) and the adapter settings under ``flower.*``,
plus a README with the commands to run it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtrust.errors import ConfigError, FedTrustError
from fedtrust.flower import LOGGER
from fedtrust.flower.app_config import FlowerSettings, config_from_run_config, config_table
from fedtrust.flower.client_app import make_client_app
from fedtrust.flower.deployment import SEVERAL_MACHINES, deployment_steps
from fedtrust.flower.executor import bind_grid
from fedtrust.runner.config import RunConfig, build_config, config_to_dict

log = logging.getLogger(LOGGER)


def make_server_app() -> ServerApp:
    """The deployable ServerApp: ``fedtrust.run`` of the run config's fedtrust config on the deployment's Grid.

    It writes the usual run directory (``fedtrust.out``, default ``runs/…``
    under the ServerApp's working directory), logs one line per round (clients that replied, failed ones,
    loss, accuracy at evaluation rounds, time), which ``flwr run --stream`` shows, and the final metrics.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedtrust.runner.run import run

        cfg = config_from_run_config(context.run_config, ["executor=flower"])
        settings = FlowerSettings.from_run_config(context.run_config)
        try:
            with bind_grid(grid, settings):
                result = run(cfg, progress=False, round_lines=lambda line: log.info("fedtrust: %s", line))
        except FedTrustError as e:
            log.error("fedtrust: error: %s", e)
            raise
        s = result.summary
        log.info("fedtrust: %s on %s finished %s rounds: test_acc %.4f; run directory %s",
                 s["algorithm"], s["dataset"], s["rounds"], s.get("test_acc", float("nan")), result.run_dir)

    return app


server_app = make_server_app()
client_app = make_client_app()

COMPONENTS = {"serverapp": "fedtrust.flower.app:server_app", "clientapp": "fedtrust.flower.app:client_app"}
PUBLISHER = "fedtrust"

_README = """\
# {name}

A Flower app running the fedtrust config in `pyproject.toml`
(`[tool.flwr.app.config]`: fedtrust keys under `fedtrust.*`, adapter settings
under `flower.*`), written by `fedtrust flower-app`. fedtrust (`pip install
'fedtrust[flower]'`) must be installed wherever the SuperLink and the
SuperNodes run; the app itself carries no code. One SuperNode per client,
`partition-id` 0 … {last}. On one machine, from the directory that holds this
app (the same steps as fedtrust's README, "Scaling out"):

```bash
{steps}```

{several}
"""


def app_pyproject(cfg: RunConfig, name: str) -> dict[str, Any]:
    """The ``pyproject.toml`` of a Flower app running ``cfg`` on a deployment."""
    return {
        "project": {"name": name, "version": "1.0.0", "license": "Apache-2.0", "dependencies": [],
                    "description": f"fedtrust: {cfg.algorithm.name} on {cfg.data.dataset} as a Flower app"},
        "tool": {"flwr": {"app": {"publisher": PUBLISHER, "components": dict(COMPONENTS),
                                  "config": config_table(cfg)}}},
    }


def write_app(cfg: RunConfig, outdir: str | Path, name: str | None = None) -> Path:
    """Write a Flower app directory running ``cfg`` (``executor`` forced to ``flower``); returns its path."""
    import tomli_w

    out = Path(outdir)
    if (out / "pyproject.toml").exists():
        raise ConfigError(f"{str(out)!r} already holds a pyproject.toml; choose a new directory")
    cfg = build_config(config_to_dict(cfg), ["executor=flower"])
    name = name or f"fedtrust-{cfg.algorithm.name}-{cfg.data.dataset}".replace("_", "-")
    out.mkdir(parents=True, exist_ok=True)
    (out / "pyproject.toml").write_text(
        "# A Flower app running a fedtrust config; written by `fedtrust flower-app`.\n"
        + tomli_w.dumps(app_pyproject(cfg, name)))
    n = cfg.data.num_clients
    steps = deployment_steps(n, app=out.name, config=None)
    (out / "README.md").write_text(_README.format(name=name, last=n - 1, steps=steps, several=SEVERAL_MACHINES))
    return out
