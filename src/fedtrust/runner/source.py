"""Where a run starts from: ``init_from``, another run's weights, and what else it takes from that model.

``init_from`` (a run directory or its ``checkpoint.safetensors``) warm-starts a
new run from another run's last checkpointed server state, weights only: the
run builds ``algorithm.init()`` as usual (same seed, same RNG draws), then
:func:`warm_start` replaces its arrays by the source's; the source's client
store, round, RNG state and server ``meta`` are not carried over, so the run
starts at round 1 with an empty client store. The rules:

* every array of the new init state must be in the source under the same
  name, with the same shape and the same dtype (floating-point arrays may
  differ in precision; they are cast). The first key, in the init state's
  order, that is missing or differs is a one-line ConfigError, which also
  lists both sides' key prefixes. There is no renaming: algorithms that keep
  ``model/…`` (fedavg, fedprox, fedper, fedrep, ditto, fedrod, fedbabu,
  fedavg_ft) share weights with each other; FedLoGe (``backbone/``,
  ``sse_c/``, ``head_g/``, ``head_l_init/``) and FedETF (``model/backbone.…``)
  only with runs of themselves. The one exception: an algorithm's ``fresh_prefixes`` (IS&BC's new
  ``backstage/`` head) start from its init when the source holds none of their arrays.
* a source array the new state lacks is an error (naming the first such key
  in sorted order) under a prefix the new state has (another architecture:
  ``model/extra.weight``), and ignored (and said so on the console) under a
  prefix it lacks (another algorithm's server-only state, e.g. control
  variates ``c/…``).
* a source's training-only projection head (``model/projection.…``, from an objective such as RNA or
  PASCL) is ignored when the new model has none: PASCL's stage 2 fine-tunes its stage-1 model with LA.
* a source whose checkpoint round is below its config's ``rounds`` (a run
  that did not finish) is used with a warning.

The resolved ``config.yaml`` records ``init_from: {path, sha256}``: the
checkpoint file's absolute path and SHA-256. A new run given a pinned
``sha256`` (a copied resolved config) refuses a file whose hash differs. A
resume never re-applies ``init_from`` (it loads its own checkpoint) and only
warns when the source has changed or is gone since the run started.

Beyond the weights:

* Objective params set to ``pretrained`` (OECC's training accuracy A_tr, BEL's outlier prior π̂; spec
  rna.md §5) are measured on the warm-started model when the run starts and written into the resolved
  config as numbers, so a resume, and every executor (Flower's ClientApp builds its objective from the
  config), uses the same values without re-reading the source.
* ``eval.ood_model=init_from`` scores OOD detection with the source model (PASCL's stage 2 keeps its
  stage-1 model for OOD, RNA's Table 2).

In a federation the training set is the union of the clients' data: measuring A_tr there is a
simulation-time convenience; a deployment gives the number.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedtrust.errors import CheckpointError, ConfigError
from fedtrust.evaluation.predict import predict_logits
from fedtrust.fl.protocol import Message
from fedtrust.runner.checkpoint import CHECKPOINT_NAME, Checkpoint, read_checkpoint, sha256_file
from fedtrust.runner.config import RunConfig, build_config, config_to_dict
from fedtrust.runner.federation import Federation, build_federation


TRAINING_ONLY = "projection."
"""An objective's training-only head (RNA's and PASCL's projection h, unused at test time): a source that
has one warm-starts a model without it (PASCL stage 2 fine-tunes the stage-1 model with LA), said so on
the console."""


def source_file(path: str) -> Path:
    """``init_from``'s checkpoint file: the path itself, or ``checkpoint.safetensors`` in it; absolute."""
    p = Path(path).expanduser()
    return (p / CHECKPOINT_NAME if p.is_dir() else p).resolve()


def read_source(cfg: RunConfig) -> tuple[RunConfig, Checkpoint]:
    """The config with ``init_from`` pinned to ``{path, sha256}`` of its checkpoint file, and that
    checkpoint's server state (no client store, no RNG restore). Bad paths are one-line ConfigErrors."""
    assert cfg.init_from is not None
    given = cfg.init_from.path
    path = source_file(given)
    if not path.is_file():
        what = (f"directory {given!r} holds no {CHECKPOINT_NAME}" if Path(given).expanduser().is_dir()
                else f"{given!r} does not exist")
        raise ConfigError(f"config key 'init_from': {what}; expected a run directory with a checkpoint "
                          f"(a run that finished a round) or a {CHECKPOINT_NAME} file")
    before = path.stat()
    digest = sha256_file(path)
    if cfg.init_from.sha256 is not None and digest != cfg.init_from.sha256:
        raise ConfigError(f"config key 'init_from': {str(path)!r} has sha256 {digest}, the config pins "
                          f"{cfg.init_from.sha256}; the source changed (set init_from.sha256=null to accept it)")
    try:
        source = read_checkpoint(path, clients=False, rng=False)
    except CheckpointError as e:
        raise ConfigError(f"config key 'init_from': {e}") from None
    after = path.stat()
    if (before.st_ino, before.st_size, before.st_mtime_ns) != (after.st_ino, after.st_size, after.st_mtime_ns):
        raise ConfigError(f"config key 'init_from': {str(path)!r} changed while it was read (is its run still "
                          f"going?); expected a finished run's checkpoint")
    rounds = source.config.get("rounds")
    if isinstance(rounds, int) and source.round < rounds:
        warnings.warn(f"init_from {str(path)!r} holds round {source.round} of {rounds}: that run did not finish",
                      stacklevel=3)
    tree = config_to_dict(cfg) | {"init_from": {"path": str(path), "sha256": digest}}
    return build_config(tree), source


def warm_start(init: Message, source: Message, where: str, algorithm: str,
               fresh: tuple[str, ...] = ()) -> tuple[Message, list[str]]:
    """``init`` with every array replaced by the source's array of that name (rules: module docstring).

    ``fresh``: prefixes the algorithm starts from ``init`` when the source holds none of their arrays
    (``Algorithm.fresh_prefixes``). Returns the new state (``init``'s meta) and the source's key prefixes
    that were ignored.
    """
    def prefix(key: str) -> str:
        return key.split("/", 1)[0] + "/"

    def prefixes(keys: Any) -> str:
        return ", ".join(sorted({prefix(k) for k in keys})) or "nothing"

    head = f"config key 'init_from': {where!r}"
    arrays: dict[str, torch.Tensor] = {}
    kept_fresh = {p for p in fresh if not any(k.startswith(p) for k in source.arrays)}
    for key, value in init.arrays.items():
        if key.startswith(tuple(kept_fresh)):
            arrays[key] = value
            continue
        if key not in source.arrays:
            raise ConfigError(f"{head} has no array {key!r} (it holds {prefixes(source.arrays)}; {algorithm} needs "
                              f"{prefixes(init.arrays)}); expected a run of an algorithm with the same server state")
        got = source.arrays[key]
        if got.shape != value.shape:
            raise ConfigError(f"{head}: array {key!r} has shape {tuple(got.shape)} there but {tuple(value.shape)} "
                              f"here; expected the same model (name, width, ...)")
        if got.dtype != value.dtype and not (got.is_floating_point() and value.is_floating_point()):
            raise ConfigError(f"{head}: array {key!r} is {got.dtype} there but {value.dtype} here")
        arrays[key] = got.to(device=value.device, dtype=value.dtype)
    ours = {prefix(k) for k in init.arrays}
    training_only = set()
    for key in sorted(source.arrays):
        if key not in init.arrays and prefix(key) in ours:
            if key.split("/", 1)[1].startswith(TRAINING_ONLY):
                training_only.add(prefix(key) + TRAINING_ONLY + "*")
                continue
            raise ConfigError(f"{head} has array {key!r}, which {algorithm}'s state lacks; expected the same model")
    return Message(arrays, dict(init.meta)), sorted(({prefix(k) for k in source.arrays} - ours) | training_only)


def recorded_source(cfg: RunConfig, saved: dict[str, Any]) -> RunConfig:
    """On resume, an ``init_from`` given without sha256 (the user's own config rather than the run's
    config.yaml) stands for the recorded source when it resolves to the recorded path."""
    recorded = saved.get("init_from")
    if cfg.init_from is None or cfg.init_from.sha256 is not None or not isinstance(recorded, dict):
        return cfg
    if str(source_file(cfg.init_from.path)) != recorded.get("path"):
        return cfg  # config_mismatch names the difference
    return build_config(config_to_dict(cfg) | {"init_from": recorded})


def check_source_unchanged(cfg: RunConfig) -> None:
    """On resume: warn if the recorded ``init_from`` source is gone or changed (resume never re-reads it)."""
    spec = cfg.init_from
    if spec is None or spec.sha256 is None:
        return
    path = Path(spec.path)
    if not path.is_file():
        warnings.warn(f"init_from source {spec.path!r} is gone; resuming from this run's own checkpoint", stacklevel=3)
    elif sha256_file(path) != spec.sha256:
        warnings.warn(f"init_from source {spec.path!r} changed since this run started (sha256 differs); "
                      f"resuming from this run's own checkpoint", stacklevel=3)


def primary_model(fed: Federation, state: Message) -> nn.Module:
    """The algorithm's primary predictor (the one ``test_acc`` reports) for ``state``, on the run's device."""
    return next(iter(fed.algorithm.predictors(state).values())).to(fed.device)


def resolve_pretrained(cfg: RunConfig, fed: Federation, state: Message) -> tuple[RunConfig, Federation, dict[str, Any]]:
    """The config and federation with the objective's ``pretrained`` params measured on ``state`` (the
    warm-started model), and the measured values; unchanged (and ``{}``) when no param asks."""
    objective = fed.algorithm.ctx.objective
    if not any(cfg.objective.params().get(k) == "pretrained" for k in objective.from_pretrained):
        return cfg, fed, {}
    model = primary_model(fed, state)
    norm, batch = fed.algorithm.ctx.normalize, cfg.eval.batch_size
    idx = torch.cat([torch.as_tensor(i) for i in fed.data.indices]).to(fed.data.train.x.device)
    train_logits = predict_logits(model, fed.data.train.x[idx], norm, batch)
    pool = fed.algorithm.ctx.outliers
    outlier_logits = None if pool is None else predict_logits(model, pool, norm, batch)
    values = objective.pretrained_values(train_logits, fed.data.train.y[idx].to(train_logits.device), outlier_logits)
    tree = config_to_dict(cfg)
    tree["objective"].update(values)
    cfg = build_config(tree)
    return cfg, build_federation(cfg), values


def source_state(fed: Federation, cfg: RunConfig) -> Message:
    """On resume: the recorded ``init_from`` source's weights as this algorithm's state, read again for
    ``eval.ood_model=init_from`` (a source that is gone or changed is a one-line error: its scores would
    not be the ones the run started with). The global RNG is left as the checkpoint restored it."""
    assert cfg.init_from is not None
    path = Path(cfg.init_from.path)
    if not path.is_file() or (cfg.init_from.sha256 is not None and sha256_file(path) != cfg.init_from.sha256):
        raise ConfigError(f"config key 'eval.ood_model': init_from scores OOD with {str(path)!r}, which is gone or "
                          f"changed since the run started; expected the recorded source")
    source = read_checkpoint(path, clients=False, rng=False)
    with torch.random.fork_rng(devices=[]):
        state, _ = warm_start(fed.algorithm.init(), source.state, str(path), cfg.algorithm.name)
    return state
