"""The report's data model (:class:`RunData`): the only place that interprets the run files.

A run directory holds ``config.yaml``, ``metrics.jsonl``, ``partition.json``, ``summary.json`` and
``eval_scores.npz``; any may be missing or damaged, and :func:`load_run` keeps whatever parses and records
a note for each problem. For a FLIP run with a backdoor attack, :func:`load_run` also reads the benign
clients' inverted masks toward the attack's target from ``checkpoint.safetensors`` (:class:`FlipMasks`).
:mod:`~fedtrust.report.plots` and :mod:`~fedtrust.report.html` only draw the clean numbers held here.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
PARTITION_FILE = "partition.json"
SUMMARY_FILE = "summary.json"
EVAL_SCORES_FILE = "eval_scores.npz"
CHECKPOINT_FILE = "checkpoint.safetensors"
AUDIT_FILE = "audit/audit.json"
AUDIT_RECONSTRUCTIONS = "audit/reconstructions.npz"
ASSETS_DIR = "report_files"


def as_float(value: Any) -> float | None:
    """``value`` as a finite float, or None for null, NaN, infinities, booleans and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _float_list(value: Any) -> list[float | None]:
    """A JSON list of numbers as floats, with None for every entry that is not a finite number."""
    return [as_float(v) for v in value] if isinstance(value, list) else []


def _float_map(value: Any) -> dict[str, float | None]:
    """A JSON object of numbers as ``{str: float | None}`` (non-numbers become None)."""
    return {str(k): as_float(v) for k, v in value.items()} if isinstance(value, Mapping) else {}


def ood_title(name: str) -> str:
    """The display name of OOD source ``name`` ("Textures-GIMP"), or ``name`` if it is not a known source."""
    from fedtrust.data.outliers import display_name

    try:
        return display_name(name)
    except Exception:  # an unknown or since-removed source: the configured name will do
        return name


def ood_label(name: str, title: str | None = None) -> str:
    """How the report names an OOD set: its display name, plus the configured name when that differs."""
    title = title or ood_title(name)
    return title if title.lower() == name.lower() else f"{title} ({name})"


@dataclass(frozen=True)
class OODScores:
    """One OOD test set's per-sample scores: ``{score name: (N,) array}``, higher = more ID."""

    name: str
    title: str
    scores: dict[str, np.ndarray]

    @property
    def label(self) -> str:
        """The set's name in plots: display name (configured name)."""
        return ood_label(self.name, self.title)


@dataclass(frozen=True)
class EvalScoresData:
    """The contents of ``eval_scores.npz``: the final evaluation's per-sample outputs (primary predictor).

    ``labels``, ``pred`` and ``confidence`` (max softmax) cover the ID test
    set; ``id_scores`` and each ``ood`` entry hold the configured scores
    (empty when the run had no OOD test sets).
    """

    round: int | None
    predictor: str | None
    labels: np.ndarray
    pred: np.ndarray
    confidence: np.ndarray
    score_names: list[str]
    id_scores: dict[str, np.ndarray]
    ood: list[OODScores]

    @property
    def correct(self) -> np.ndarray:
        """1.0 where the prediction is right, else 0.0."""
        return (self.pred == self.labels).astype(np.float64)


@dataclass(frozen=True)
class FlipPairMask:
    """The mean inverted mask of one FLIP pair (source → the attack's target) over the clients holding it.

    ``mask`` (H, W) is the mean of m = tanh(a)/2 + 1/2 over the ``clients`` benign clients whose store caches
    the pair's raw mask ``a`` (``flip/cache/<source>_<target>/a``); its L1 is the mean of theirs.
    """

    source: int
    mask: np.ndarray
    clients: int

    @property
    def l1(self) -> float:
        """‖mask‖₁: the mean over the clients of their mask's L1 (the sum is linear)."""
        return float(self.mask.sum())


@dataclass(frozen=True)
class FlipMasks:
    """What a FLIP run's clients inverted toward the attack's target, next to the real trigger.

    ``trigger`` (H, W) is True where the attack's full test trigger (the one the ASR stamps) changes a pixel;
    ``pairs`` holds up to :data:`MAX_FLIP_SOURCES` sources (the smallest mean L1 first chosen, then shown by
    source class); ``num_sources`` counts every source found; ``clients`` is the number of benign clients
    with FLIP state in the checkpoint and ``excluded`` the attack's clients left out.
    """

    target: int
    trigger: np.ndarray
    pairs: list[FlipPairMask]
    num_sources: int
    clients: int
    round: int | None
    excluded: list[int]


MAX_FLIP_SOURCES = 9
"""The FLIP masks figure shows at most this many source classes (those with the smallest mean L1)."""


@dataclass
class RunData:
    """Everything readable from one run directory, with accessors that return clean numbers.

    ``config``, ``partition``, ``summary`` and ``eval_scores`` are None when
    their file is missing or unreadable; ``records`` holds the parsed lines of
    ``metrics.jsonl`` (eval rounds are those with a ``test_acc`` key);
    ``notes`` says, in words, what was missing or skipped; ``scores_note``
    says why there are no per-sample scores (None when there are); ``flip_masks``
    holds a FLIP run's inverted masks toward its backdoor target (None for other runs).
    """

    path: Path
    config: dict[str, Any] | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    partition: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    eval_scores: EvalScoresData | None = None
    scores_note: str | None = None
    flip_masks: FlipMasks | None = None
    audit: AuditData | None = None

    # --- identity -----------------------------------------------------------

    @property
    def name(self) -> str:
        """The run directory's name."""
        return self.path.name

    def _config_section(self, key: str) -> dict[str, Any]:
        """A section of the config as a dict (empty when absent or not a mapping)."""
        section = (self.config or {}).get(key)
        return section if isinstance(section, dict) else {}

    def _summary_str(self, key: str) -> str | None:
        """A string field of summary.json, or None."""
        value = (self.summary or {}).get(key)
        return str(value) if value is not None else None

    @property
    def algorithm(self) -> str | None:
        """The algorithm's name, from summary.json or the config."""
        raw = (self.config or {}).get("algorithm")
        from_config = raw if isinstance(raw, str) else self._config_section("algorithm").get("name")
        return self._summary_str("algorithm") or (str(from_config) if from_config else None)

    @property
    def label(self) -> str:
        """How plots and tables name the run: directory name plus algorithm."""
        return f"{self.name} ({self.algorithm})" if self.algorithm else self.name

    @property
    def dataset(self) -> str | None:
        """The data set's name, from summary.json or the config."""
        return self._summary_str("dataset") or _opt_str(self._config_section("data").get("dataset"))

    @property
    def partition_name(self) -> str | None:
        """The partition's name with its parameters, e.g. ``dirichlet (alpha=0.5)``."""
        part = self.partition or {}
        name = _opt_str(part.get("partition")) or _opt_str(self._config_section("data").get("partition"))
        params = part.get("params")
        if name and isinstance(params, Mapping) and params:
            return f"{name} ({', '.join(f'{k}={v}' for k, v in params.items())})"
        return name

    # --- metrics ------------------------------------------------------------

    @property
    def eval_records(self) -> list[dict[str, Any]]:
        """The metric lines of evaluation rounds, in file order."""
        return [r for r in self.records if "test_acc" in r]

    @property
    def final_eval(self) -> dict[str, Any] | None:
        """The last evaluation record, or summary.json when metrics.jsonl has none."""
        evals = self.eval_records
        if evals:
            return evals[-1]
        return self.summary if self.summary and "test_acc" in self.summary else None

    @property
    def predictors(self) -> list[str]:
        """Names of the predictors in ``by_predictor`` (first = primary); empty for a single predictor."""
        final = self.final_eval or {}
        by_pred = final.get("by_predictor")
        return [str(k) for k in by_pred] if isinstance(by_pred, Mapping) else []

    @staticmethod
    def _view(record: Mapping[str, Any], predictor: str | None) -> Mapping[str, Any]:
        """The part of ``record`` that describes ``predictor`` (the flat keys for None)."""
        if predictor is None:
            return record
        by_pred = record.get("by_predictor")
        view = by_pred.get(predictor) if isinstance(by_pred, Mapping) else None
        return view if isinstance(view, Mapping) else {}

    def series(self, key: str, predictor: str | None = None) -> tuple[list[int], list[float]]:
        """Rounds and finite values of ``key`` over all records (e.g. ``test_acc``, ``train_loss``)."""
        rounds: list[int] = []
        values: list[float] = []
        for record in self.records:
            value = as_float(self._view(record, predictor).get(key))
            rnd = record.get("round")
            if value is not None and isinstance(rnd, int) and not isinstance(rnd, bool):
                rounds.append(rnd)
                values.append(value)
        return rounds, values

    def leakage_series(self, key: str = "i2f_lb") -> tuple[list[int], list[float]]:
        """Rounds and values of the ``leakage`` evaluator's ``key`` (mean I_lb by default)."""
        rounds: list[int] = []
        values: list[float] = []
        for record in self.records:
            leak = record.get("leakage")
            value = as_float(leak.get(key)) if isinstance(leak, dict) else None
            rnd = record.get("round")
            if value is not None and isinstance(rnd, int) and not isinstance(rnd, bool):
                rounds.append(rnd)
                values.append(value)
        return rounds, values

    def final_value(self, key: str, predictor: str | None = None) -> float | None:
        """A scalar of the final evaluation, or None."""
        return as_float(self._view(self.final_eval or {}, predictor).get(key))

    def final_raw(self, key: str, predictor: str | None = None) -> Any:
        """A metric of the final evaluation as recorded (a mapping such as ``cost`` or ``robust``), or None."""
        return self._view(self.final_eval or {}, predictor).get(key)

    def final_list(self, key: str, predictor: str | None = None) -> list[float | None]:
        """A list metric of the final evaluation (``class_acc``, ``client_acc``), nulls as None."""
        return _float_list(self._view(self.final_eval or {}, predictor).get(key))

    def final_mapping(self, key: str, predictor: str | None = None) -> dict[str, float | None]:
        """A mapping metric of the final evaluation (``group_acc``, ``hmt_acc``), nulls as None."""
        return _float_map(self._view(self.final_eval or {}, predictor).get(key))

    def client_acc_mean(self, predictor: str | None = None) -> float | None:
        """Mean personalized client accuracy: ``client_acc_mean``, else the mean of ``client_acc``."""
        mean = self.final_value("client_acc_mean", predictor)
        if mean is not None:
            return mean
        accs = [a for a in self.final_list("client_acc", predictor) if a is not None]
        return sum(accs) / len(accs) if accs else None

    @property
    def best(self) -> tuple[float, int] | None:
        """Best test accuracy over the eval rounds and the round it was reached (first on ties)."""
        rounds, accs = self.series("test_acc")
        if not accs:
            return None
        i = max(range(len(accs)), key=lambda j: (accs[j], -j))
        return accs[i], rounds[i]

    @property
    def final_ood(self) -> dict[str, dict[str, float | None]]:
        """OOD metrics of the final evaluation: ``{set name: {metric: value}}`` (empty if none)."""
        ood = (self.final_eval or {}).get("ood")
        if not isinstance(ood, Mapping):
            return {}
        return {str(k): _float_map(v) for k, v in ood.items() if isinstance(v, Mapping)}

    @property
    def rounds_done(self) -> int | None:
        """Rounds completed: summary.json's ``rounds``, else the last metric line's round."""
        done = (self.summary or {}).get("rounds")
        if isinstance(done, int) and not isinstance(done, bool):
            return done
        rounds = [r["round"] for r in self.records if isinstance(r.get("round"), int)]
        return max(rounds) if rounds else None

    @property
    def rounds_planned(self) -> int | None:
        """Rounds the config asked for, or None."""
        planned = (self.config or {}).get("rounds")
        return planned if isinstance(planned, int) and not isinstance(planned, bool) else None

    @property
    def wall_time_s(self) -> float | None:
        """Wall time: summary.json's ``wall_time_s``, else the last metric line's ``time_s``."""
        wall = as_float((self.summary or {}).get("wall_time_s"))
        if wall is not None:
            return wall
        times = [t for t in (as_float(r.get("time_s")) for r in self.records) if t is not None]
        return times[-1] if times else None

    # --- partition ----------------------------------------------------------

    @property
    def class_counts(self) -> list[float | None]:
        """Training examples per class (empty without partition.json)."""
        return _float_list((self.partition or {}).get("class_counts"))

    @property
    def label_hist(self) -> list[list[float]]:
        """Per-client class counts (rows: clients), nulls as 0; empty without partition.json."""
        hist = (self.partition or {}).get("label_hist")
        if not isinstance(hist, list):
            return []
        return [[v or 0.0 for v in _float_list(row)] for row in hist if isinstance(row, list)]


def _opt_str(value: Any) -> str | None:
    """``str(value)``, or None for None."""
    return None if value is None else str(value)


# --- loading -----------------------------------------------------------------


def _read_text(path: Path, notes: list[str], missing_note: str) -> str | None:
    """The file's text, or None with a note when it is missing or unreadable."""
    if not path.is_file():
        notes.append(f"{path.name} is missing: {missing_note}")
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        notes.append(f"{path.name} could not be read ({err})")
        return None


def _read_mapping(path: Path, notes: list[str], missing_note: str) -> dict[str, Any] | None:
    """A YAML or JSON file whose top level is a mapping, or None with a note."""
    text = _read_text(path, notes, missing_note)
    if text is None:
        return None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        notes.append(f"{path.name} is not valid {path.suffix.lstrip('.').upper()}: {str(err).splitlines()[0]}")
        return None
    if not isinstance(data, dict):
        notes.append(f"{path.name} does not hold a mapping; ignored")
        return None
    return data


def _read_metrics(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """The JSON objects of metrics.jsonl; lines that do not parse are skipped with a note."""
    text = _read_text(path, notes, "no metrics were recorded (the run may have stopped before its first round)")
    if text is None:
        return []
    records: list[dict[str, Any]] = []
    bad: list[int] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(lineno)
    if bad:
        where = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        notes.append(
            f"skipped {len(bad)} unreadable line(s) of {path.name} (line {where}; "
            "a killed run leaves its last line truncated)"
        )
    if not records and not bad:
        notes.append(f"{path.name} is empty: no metrics were recorded yet")
    elif records and not any("test_acc" in r for r in records):
        notes.append(f"{path.name} has no evaluation round yet: no accuracy to show")
    return records


def _str_list(data: Mapping[str, np.ndarray], key: str) -> list[str]:
    """A string array of the ``.npz`` as a list (empty when absent)."""
    return [str(v) for v in np.asarray(data[key]).reshape(-1)] if key in data else []


def _scalar(data: Mapping[str, np.ndarray], key: str) -> Any:
    """A 0-d entry of the ``.npz`` as a Python value, or None."""
    if key not in data:
        return None
    value = np.asarray(data[key])
    return value.item() if value.size == 1 else None


def _vector(data: Mapping[str, np.ndarray], key: str, size: int | None, dtype: type) -> np.ndarray:
    """A 1-d array of the ``.npz`` (of length ``size`` when given); ValueError names the key otherwise."""
    if key not in data:
        raise ValueError(f"no array {key!r}")
    value = np.asarray(data[key])
    if value.ndim != 1 or (size is not None and value.size != size):
        raise ValueError(f"{key!r} has shape {value.shape}, expected ({size if size is not None else 'N'},)")
    return value.astype(dtype)


def _parse_eval_scores(data: Mapping[str, np.ndarray]) -> EvalScoresData:
    """:class:`EvalScoresData` from the arrays of ``eval_scores.npz`` (``runner.rundir.write_eval_scores``)."""
    labels = _vector(data, "labels", None, np.int64)
    n = labels.size
    names = _str_list(data, "scores")
    sets = _str_list(data, "ood_sets")
    titles = _str_list(data, "ood_titles")
    titles = titles if len(titles) == len(sets) else [ood_title(s) for s in sets]
    ood = [OODScores(name, title, {s: _vector(data, f"ood/{k}/{s}", None, np.float64) for s in names})
           for k, (name, title) in enumerate(zip(sets, titles))]
    round_ = _scalar(data, "round")
    predictor = _scalar(data, "predictor")
    return EvalScoresData(
        round=int(round_) if isinstance(round_, (int, np.integer)) else None,
        predictor=str(predictor) if predictor is not None else None,
        labels=labels,
        pred=_vector(data, "pred", n, np.int64),
        confidence=_vector(data, "confidence", n, np.float64),
        score_names=names,
        id_scores={s: _vector(data, f"id/{s}", n, np.float64) for s in names},
        ood=ood,
    )


def _read_eval_scores(path: Path, notes: list[str]) -> tuple[EvalScoresData | None, str | None]:
    """The run's per-sample scores, or None and the reason (a broken file also gets a note)."""
    if not path.is_file():
        return None, (f"no {path.name} (a run from before per-sample scores were saved, or one that stopped "
                      "before its last round): no score histograms, ROC curves or reliability diagram")
    try:
        if not zipfile.is_zipfile(path):
            raise ValueError("not an .npz archive")
        with np.load(path, allow_pickle=False) as npz:
            scores = _parse_eval_scores({key: npz[key] for key in npz.files})
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        reason = f"{path.name} could not be read ({err})"
        notes.append(reason)
        return None, reason + ": no score histograms, ROC curves or reliability diagram"
    return scores, None


def _flip_attack(config: Mapping[str, Any] | None) -> bool:
    """True for a run of algorithm ``flip`` under an attack (the runs the FLIP masks figure is for)."""
    algorithm = (config or {}).get("algorithm")
    attack = (config or {}).get("attack")
    return (isinstance(algorithm, Mapping) and algorithm.get("name") == "flip"
            and isinstance(attack, Mapping) and attack.get("name") is not None)


def _pair_key(key: str) -> tuple[int, int, int, str] | None:
    """``client/<id>/flip/cache/<s>_<t>/<a|b>`` as (id, s, t, a|b), else None."""
    parts = key.split("/")
    if len(parts) != 6 or parts[0] != "client" or parts[2:4] != ["flip", "cache"] or parts[5] not in ("a", "b"):
        return None
    try:
        s, t = (int(v) for v in parts[4].split("_"))
        return int(parts[1]), s, t, parts[5]
    except ValueError:
        return None


def _read_flip_masks(path: Path, config: Mapping[str, Any]) -> FlipMasks | str:
    """The benign clients' masks toward the attack's target, or why there are none (a one-line reason).

    The real trigger is the attack's own ASR trigger (:func:`fedtrust.runner.federation.asr_trigger` of the
    attack the run config builds), its pixels those its ``stamp`` changes; the image shape and the number of
    classes come from the checkpoint (a cached pattern ``b`` is (C, H, W), ``flip/mat_diff`` is (K, K)).
    """
    from safetensors import SafetensorError, safe_open

    from fedtrust.errors import FedTrustError
    from fedtrust.robust.inversion import to_mask
    from fedtrust.robust.triggers import stamped_pixels
    from fedtrust.runner.config import build_config
    from fedtrust.runner.federation import asr_trigger, build_run_attack

    if not path.is_file():
        return f"no {path.name}: no FLIP masks to show"
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("fedtrust", "{}"))
            keys = list(fh.keys())
            pairs = [(k, p) for k in keys if (p := _pair_key(k)) is not None]
            any_b = next((k for k, p in pairs if p[3] == "b"), None)
            mat = next((k for k in keys if k.startswith("client/") and k.endswith("/flip/mat_diff")), None)
            if any_b is None or mat is None:
                return f"{path.name} holds no FLIP mask cache (no client reached pair hardening)"
            image_shape = tuple(fh.get_slice(any_b).get_shape())
            num_classes = int(fh.get_slice(mat).get_shape()[0])
            attack = build_run_attack(build_config(dict(config)), num_classes)
            full = asr_trigger(attack, image_shape)
            if attack is None or full is None:
                return "the run's attack has no trigger: no FLIP masks to compare"
            trigger, target = full
            excluded = sorted(attack.targets.clients)
            benign = {int(k.split("/")[1]) for k in keys if k.startswith("client/") and "/flip/" in k} - set(excluded)
            by_source: dict[int, list[np.ndarray]] = {}
            for key, (cid, s, t, part) in pairs:
                if part == "a" and t == target and cid not in excluded:
                    by_source.setdefault(s, []).append(to_mask(fh.get_tensor(key).double()).numpy())
            pixels = stamped_pixels(trigger, image_shape).numpy()
    except (SafetensorError, OSError, ValueError, KeyError, FedTrustError, RuntimeError) as err:
        first = (str(err).splitlines() or [""])[0]
        return f"{path.name}: FLIP masks could not be read ({type(err).__name__}: {first})"
    found = [FlipPairMask(s, np.mean(masks, axis=0), len(masks)) for s, masks in sorted(by_source.items())]
    shown = sorted(sorted(found, key=lambda p: (p.l1, p.source))[:MAX_FLIP_SOURCES], key=lambda p: p.source)
    round_ = meta.get("round")
    return FlipMasks(target, pixels, shown, len(found), len(benign),
                     round_ if isinstance(round_, int) else None, excluded)


@dataclass
class AuditData:
    """``fedtrust audit``'s results (``audit/audit.json``) and its reconstructions in [0, 1] pixels
    (``audit/reconstructions.npz``: ``x0_<i>``, ``xhat_<i>``, each ``(B, C, H, W)``; empty when unreadable)."""

    round: int | None
    settings: dict[str, Any]
    rows: list[dict[str, Any]]
    cost: dict[str, Any]
    originals: dict[int, np.ndarray] = field(default_factory=dict)
    reconstructions: dict[int, np.ndarray] = field(default_factory=dict)


def _read_audit(path: Path, notes: list[str]) -> AuditData | None:
    """The run's audit, or None (silently when the run was never audited; a note when it is damaged)."""
    file = path / AUDIT_FILE
    if not file.exists():
        return None
    try:
        data = json.loads(file.read_text())
        rows = [r for r in data["rows"] if isinstance(r, dict)]
        audit = AuditData(data.get("round"), dict(data.get("settings") or {}), rows, dict(data.get("cost") or {}))
    except (OSError, ValueError, KeyError, TypeError) as err:
        notes.append(f"{AUDIT_FILE} could not be read ({type(err).__name__}); no Privacy section")
        return None
    try:
        with np.load(path / AUDIT_RECONSTRUCTIONS) as npz:
            for key in npz.files:
                kind, _, index = key.partition("_")
                if index.isdigit() and kind in ("x0", "xhat"):
                    (audit.originals if kind == "x0" else audit.reconstructions)[int(index)] = npz[key]
    except (OSError, ValueError) as err:
        if any(r.get("recon") is not None for r in rows):
            notes.append(f"{AUDIT_RECONSTRUCTIONS} could not be read ({type(err).__name__}); no reconstructions shown")
    return audit


def load_run(run_dir: Path | str) -> RunData:
    """Read a run directory; missing or malformed files become notes, never exceptions."""
    path = Path(run_dir).resolve()
    notes: list[str] = []
    config = _read_mapping(path / CONFIG_FILE, notes, "the run's settings are unknown")
    records = _read_metrics(path / METRICS_FILE, notes)
    partition = _read_mapping(path / PARTITION_FILE, notes, "no partition histogram")
    unfinished = "the run did not finish (final numbers come from metrics.jsonl)"
    summary = _read_mapping(path / SUMMARY_FILE, notes, unfinished)
    eval_scores, scores_note = _read_eval_scores(path / EVAL_SCORES_FILE, notes)
    flip_masks = None
    if config is not None and _flip_attack(config):
        read = _read_flip_masks(path / CHECKPOINT_FILE, config)
        if isinstance(read, str):
            notes.append(read)
        else:
            flip_masks = read
    audit = _read_audit(path, notes)
    return RunData(path, config, records, partition, summary, notes, eval_scores, scores_note, flip_masks, audit)
