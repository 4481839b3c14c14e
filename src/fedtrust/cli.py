"""The ``fedtrust`` command: a thin layer over the Python API.

    fedtrust run [CONFIG.yaml] [key=value ...] [--resume RUN_DIR] [--quiet]
    fedtrust fork RUN_DIR OUT_DIR [key=value ...]
    fedtrust report RUN_DIR [RUN_DIR ...] [-o OUT.html]
    fedtrust list [KIND]
    fedtrust audit RUN_DIR | CONFIG.yaml [key=value ...] [--attack dlg|ig|none] [--target gradient|update] ...
    fedtrust flower-app CONFIG.yaml OUTDIR [key=value ...]
    fedtrust flower-certs OUTDIR --host ADDR [--host ADDR ...] [--nodes N] [--days D]
    fedtrust flower-superlink [--operator ADDR[/BITS] ...] FLOWER_SUPERLINK_ARGS ...

Errors a user can cause print one line (``error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedtrust.errors import FedTrustError

ROLES = {"train": "training outliers", "test": "OOD tests", "either": "training outliers or OOD tests"}
AUTO_EXECUTOR = ("vectorized where it is faster: declarative local training, several clients per round "
                 "and, on a CPU, small enough models; else sequential (the run log says which and why)")
LIST_KINDS = ("algorithm", "objective", "score", "dataset", "outliers", "partitioner", "model", "executor", "attack",
              "aggregator", "evaluator", "sampler")


def _cmd_run(args: argparse.Namespace) -> int:
    from fedtrust.runner.run import run

    config, overrides = None, []
    for item in args.items:
        if "=" in item:
            overrides.append(item)
        elif config is None:
            config = item
        else:
            raise FedTrustError(f"unexpected argument {item!r}: give one CONFIG.yaml and key=value overrides")
    run(config, overrides, resume=args.resume, progress=not args.quiet)
    return 0


def _cmd_fork(args: argparse.Namespace) -> int:
    from fedtrust.runner.fork import fork_run

    for item in args.overrides:
        if "=" not in item:
            raise FedTrustError(f"unexpected argument {item!r}: a fork takes RUN_DIR, OUT_DIR and key=value overrides")
    out = fork_run(args.run_dir, args.out_dir, args.overrides)
    print(f"forked {args.run_dir} into {out}; continue it with: fedtrust run --resume {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from fedtrust.report import write_report

    dirs = [Path(d) for d in args.run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise FedTrustError(f"run directory {str(d)!r} does not exist")
    path = write_report(dirs, Path(args.output) if args.output else None)
    print(f"report: {path}")
    return 0


def _number_list(text: str, kind: type, what: str) -> tuple:
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise FedTrustError(f"{what} must be a comma-separated list of numbers, got {text!r}") from None


def _cmd_audit(args: argparse.Namespace) -> int:
    from fedtrust.report import write_report
    from fedtrust.runner.audit import AuditSettings, audit_run, audit_table, write_audit

    settings = AuditSettings(
        clients=_number_list(args.clients, int, "--clients") if args.clients else None,
        num_clients=args.num_clients, samples=args.samples, target=args.target, steps=args.steps,
        sigmas=_number_list(args.sigma, float, "--sigma"), attack=args.attack, iterations=args.iterations,
        restarts=args.restarts, seed=args.seed)
    result = audit_run(args.source, settings, args.overrides, args.out, log=None if args.quiet else print)
    folder = write_audit(result)
    if not args.quiet:
        print("\n".join(audit_table(result)))
    print(f"audit: {folder}")
    if not args.no_report:
        print(f"report: {write_report([result.run_dir])}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from fedtrust.registry import get, names

    kinds = [args.kind] if args.kind else list(LIST_KINDS)
    for kind in kinds:
        if kind not in LIST_KINDS:
            raise FedTrustError(f"unknown kind {kind!r}; valid: {', '.join(LIST_KINDS)}")
        print(f"{kind}:" if kind.endswith("s") else f"{kind}s:")
        for name in names(kind):
            print(f"  {name:<16} {_describe(get(kind, name))}")
        if kind == "executor":
            print(f"  {'auto':<16} (the default) {AUTO_EXECUTOR}")
    return 0


def _describe(obj: object) -> str:
    """One line for ``fedtrust list``: an outlier source's display name and role, else the first docstring line."""
    if hasattr(obj, "display") and hasattr(obj, "role"):
        return f"{obj.display} (for {ROLES.get(obj.role, obj.role)})"
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    return doc[0] if doc else ""


def _cmd_flower_app(args: argparse.Namespace) -> int:
    from fedtrust.flower import require_flower

    require_flower("fedtrust flower-app")
    from fedtrust.flower.app import write_app
    from fedtrust.runner.config import load_config

    out = write_app(load_config(args.config, args.overrides), args.outdir)
    print(f"Flower app: {out} (run it with: flwr run {out} <superlink-connection> --stream)")
    return 0


def _cmd_flower_certs(args: argparse.Namespace) -> int:
    from fedtrust.flower.certs import write_certificates

    files = write_certificates(args.outdir, args.host, nodes=args.nodes, days=args.days)
    print(f"wrote to {files.ca_cert.parent}:")
    print(f"  CA:        {files.ca_cert.name} (give to SuperNodes and flwr), {files.ca_key.name} (keep private)")
    print(f"  SuperLink: {files.server_cert.name}, {files.server_key.name}")
    if files.node_keys:
        pairs = ", ".join(f"{k.name} + {p.name}" for k, p in zip(files.node_keys, files.node_public_keys))
        print(f"  SuperNode keys: {pairs}")
    print(f"server certificate valid for: {', '.join(files.server_names)} ({args.days} days)")
    return 0


def _cmd_flower_superlink(args: argparse.Namespace, flower_args: list[str]) -> int:
    from fedtrust.flower import require_flower

    require_flower("fedtrust flower-superlink")
    from fedtrust.flower.superlink_guard import LOOPBACK, parse_operators, run_guarded_superlink

    operators = parse_operators([*LOOPBACK, *(args.operator or [])])
    run_guarded_superlink(flower_args, operators)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtrust", description="Trustworthy federated learning.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run (or resume) a federated job; no arguments: FedAvg on bundled digits")
    p_run.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                       help="an optional YAML config, then dotted overrides such as rounds=10 data.alpha=0.1")
    p_run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoint")
    p_run.add_argument("--quiet", action="store_true", help="no progress bar or summary table")
    p_run.set_defaults(func=_cmd_run)
    p_fork = sub.add_parser("fork", help="branch a run from its last checkpoint with some config keys changed; "
                                         "continue the branch with run --resume OUT_DIR")
    p_fork.add_argument("run_dir", metavar="RUN_DIR", help="the run to branch from (only read)")
    p_fork.add_argument("out_dir", metavar="OUT_DIR", help="new run directory for the branch")
    p_fork.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. algorithm.tau_inv=0.5 rounds=120 (not seed, data.*, model.*, "
                             "algorithm.name, init_from, executor)")
    p_fork.set_defaults(func=_cmd_fork)
    p_rep = sub.add_parser("report", help="write an HTML report of one or more run directories")
    p_rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p_rep.add_argument("-o", "--output", metavar="OUT.html", help="where to write the report")
    p_rep.set_defaults(func=_cmd_report)
    p_list = sub.add_parser("list", help="list registered components (algorithms, models, attacks, aggregators, ...)")
    p_list.add_argument("kind", nargs="?", help=f"one of {', '.join(LIST_KINDS)}")
    p_list.set_defaults(func=_cmd_list)
    p_au = sub.add_parser("audit", help="gradient-leakage audit (I2F risk, optional DLG/IG attack) of a finished run "
                                         "or of a config's initial model")
    p_au.add_argument("source", metavar="RUN_DIR | CONFIG.yaml")
    p_au.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides (a CONFIG.yaml only)")
    p_au.add_argument("--clients", metavar="IDS", help="comma-separated client ids to probe (default: the first "
                                                        "--num-clients clients with data)")
    p_au.add_argument("--num-clients", type=int, default=2, help="clients to probe when --clients is not given")
    p_au.add_argument("--samples", type=int, default=2, help="samples per client (the batch size B for --target "
                                                             "update)")
    p_au.add_argument("--target", choices=["gradient", "update"], default="gradient",
                      help="one sample's gradient, or the client's FedAvg update of B samples and S steps")
    p_au.add_argument("--steps", type=int, help="local SGD steps S of --target update (default train.steps, else 1)")
    p_au.add_argument("--sigma", default="1e-3", help="comma-separated reference noise stds on the shared gradient")
    p_au.add_argument("--attack", choices=["dlg", "ig", "none"], default="dlg",
                      help="attack run on each defended target: DLG (L-BFGS), Inverting Gradients, or none")
    p_au.add_argument("--iterations", type=int, help="attack iterations per restart (default: DLG 20 L-BFGS steps, "
                                                     "IG 500 Adam steps)")
    p_au.add_argument("--restarts", type=int, default=2, help="attack restarts (the lowest matching loss is kept)")
    p_au.add_argument("--seed", type=int, default=0, help="seed of the attack starts and the reference noise")
    p_au.add_argument("--out", metavar="DIR", help="where audit/ goes (default: the run directory; for a config, "
                                                   "a new folder under runs/)")
    p_au.add_argument("--no-report", action="store_true", help="do not rewrite the HTML report")
    p_au.add_argument("--quiet", action="store_true", help="print only where the results went")
    p_au.set_defaults(func=_cmd_audit)
    p_fa = sub.add_parser("flower-app", help="write a Flower app directory that runs CONFIG with `flwr run`")
    p_fa.add_argument("config", metavar="CONFIG.yaml")
    p_fa.add_argument("outdir", metavar="OUTDIR", help="new directory for the app (pyproject.toml, README.md)")
    p_fa.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, as for `fedtrust run`")
    p_fa.set_defaults(func=_cmd_flower_app)
    p_fc = sub.add_parser("flower-certs", help="write a CA, a SuperLink TLS certificate and SuperNode key pairs "
                                               "for a Flower deployment")
    p_fc.add_argument("outdir", metavar="OUTDIR", help="new or empty directory for the files")
    p_fc.add_argument("--host", action="append", required=True, metavar="ADDR",
                      help="an IP address or DNS name the SuperLink is reached at, without a port (repeatable); "
                           "127.0.0.1, ::1 and localhost are always added")
    p_fc.add_argument("--nodes", type=int, default=2, help="SuperNode authentication key pairs to write")
    p_fc.add_argument("--days", type=int, default=365, help="days the certificates are valid")
    p_fc.set_defaults(func=_cmd_flower_certs)
    p_sl = sub.add_parser("flower-superlink", help="Flower's SuperLink with its Control and Runtime APIs open only "
                                                   "to the operator (loopback and --operator); other arguments go "
                                                   "to flower-superlink")
    p_sl.add_argument("--operator", action="append", metavar="ADDR[/BITS]",
                      help="an address or network besides loopback allowed to use the Control API (flwr CLI); "
                           "repeatable")
    p_sl.set_defaults(func=_cmd_flower_superlink, passthrough=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedtrust`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args, extra) if getattr(args, "passthrough", False) else args.func(args)
    except FedTrustError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with: fedtrust run --resume RUN_DIR", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
