"""`trainer register RUN --name NAME` and `trainer registry list|show|promote`: the model registry (MLflow).

The registry itself is trainer/registry.py; this is its command line. Every mistake is one line, exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from launch.cli_args import OneLineParser
from trainer.errors import UserError

REGISTER_DESCRIPTION = """\
Register a finished run's result as a new version of NAME in the model registry (MLflow), with its lineage: base
model (path, config and weight-index hashes), data (each file's hash, the pipeline fingerprint), the frozen config,
the project's version and git commit, the W&B run id, and the eval figures before and after training.

The registry: --tracking-uri, else MLFLOW_TRACKING_URI, else the run's registry.tracking_uri, else an embedded store
(SQLite + local artifacts) in <paths.runs_dir>/registry/ (runs/registry/ from where you run trainer).

e.g. trainer register runs/demo-20261206-101500 --name facts --alias champion --require "eval.exact_match>=0.6" \\
         --require "forgetting_increase<=0.3"
"""

REGISTRY_DESCRIPTION = """\
  list [NAME]                       registered models and their versions, aliases and eval figures
  show NAME[@ALIAS|/VERSION]        one version (default: the newest): source, metrics and lineage
  promote NAME/VERSION --alias A [--require EXPR ...]
                                    point alias A (e.g. champion) at a version whose metrics pass the gate
"""


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help="MLflow tracking URI or a directory for an embedded store "
                        "(default: MLFLOW_TRACKING_URI, else runs/registry)")


def _add_gate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--require", action="append", default=[], metavar="EXPR",
                        help='a gate such as "eval.exact_match>=0.6" or "forgetting_increase<=0.3"; repeatable: '
                        "a result that fails any is refused")


def register_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="trainer register", description=REGISTER_DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished run dir (its final/ is registered)")
    parser.add_argument("--name", required=True, help="the registered model's name")
    parser.add_argument("--alias", action="append", default=[], help="alias for the new version (e.g. champion); "
                        "repeatable")
    parser.add_argument("--merged", action="store_true", help="register the adapter merged into its base model")
    parser.add_argument("--description", help="the version's description (default: base, data, commit, figures)")
    _add_gate(parser)
    _add_common(parser)
    return parser


def _run_tracking_uri(run_dir: str, explicit: str | None) -> str:
    from trainer.registry import tracking_uri
    from trainer.run_identity import read_config_dict

    config_path = os.path.join(run_dir, "config.yaml")
    config = read_config_dict(config_path) if os.path.isfile(config_path) else {}
    configured = (config.get("registry") or {}).get("tracking_uri")
    runs_dir = (config.get("paths") or {}).get("runs_dir") or "runs"
    return tracking_uri(explicit or os.environ.get("MLFLOW_TRACKING_URI") or configured, runs_dir)


def registry_errors(command):
    """An MLflow store that cannot be reached or refuses a request: one line naming it, not a traceback."""
    import functools

    @functools.wraps(command)
    def wrapped(argv: list[str]) -> int:
        try:
            return command(argv)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 -- sorted below: only MLflow's and the network's become one line
            from mlflow.exceptions import MlflowException
            from requests.exceptions import RequestException

            if not isinstance(err, (MlflowException, RequestException)):
                raise
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"registry: {message[:300]} (check --tracking-uri / MLFLOW_TRACKING_URI and that the "
                            "MLflow server is up)") from None
    return wrapped


@registry_errors
def register_main(argv: list[str]) -> int:
    from trainer.gate import parse_requirement

    args = register_parser().parse_args(argv)
    requirements = [parse_requirement(text) for text in args.require]
    if not os.path.isdir(args.run):
        raise UserError(f"register: {args.run!r} is not a run dir")
    _check_name(args.name, "--name")
    from trainer.registry import register_run, shown_uri

    uri = _run_tracking_uri(args.run, args.tracking_uri)
    done = register_run(args.run, args.name, uri, aliases=args.alias, requirements=requirements,
                        merged=args.merged, description=args.description)
    aliases = f" (alias {', '.join(done.aliases)})" if done.aliases else ""
    tags = done.tags
    print(f"registered {done.name} version {done.version}{aliases} in {shown_uri(uri)}\n"
          f"  source: {done.source}\n  mlflow run: {done.run_id}\n"
          f"  base: {tags.get('lineage.base_model.path')}  data fingerprint: "
          f"{tags.get('lineage.data_fingerprint', '-')}  commit: {tags.get('lineage.code.git_commit', '-')[:12]}")
    return 0


def _check_name(name: str, where: str) -> None:
    if not name or any(c in name for c in "@/:") or name != name.strip():
        raise UserError(f"register: {where} {name!r}: a registered model name has no '@', '/' or ':' (they "
                        "separate aliases, versions and the registry: prefix)")


# ------------------------------------------------------------------------------------------- trainer registry
def registry_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="trainer registry", description=REGISTRY_DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="list|show|promote")
    listing = commands.add_parser("list", help="registered models and versions")
    listing.add_argument("name", nargs="?")
    show = commands.add_parser("show", help="one version with its lineage")
    show.add_argument("reference", help="NAME, NAME@ALIAS or NAME/VERSION")
    promote = commands.add_parser("promote", help="set an alias on a version that passes the gate")
    promote.add_argument("reference", help="NAME/VERSION (or NAME@ALIAS, NAME: newest)")
    promote.add_argument("--alias", required=True)
    _add_gate(promote)
    for sub in (listing, show, promote):
        _add_common(sub)
    return parser


def _short(metrics: dict) -> str:
    keys = ("eval.exact_match", "eval.loss", "eval.forgetting_increase")
    return "  ".join(f"{key.removeprefix('eval.')}={metrics[key]:.4g}" for key in keys if key in metrics)


@registry_errors
def registry_main(argv: list[str]) -> int:
    from trainer.gate import parse_requirement

    args = registry_parser().parse_args(argv)
    requirements = [parse_requirement(text) for text in getattr(args, "require", [])]
    from trainer.registry import find_version, open_client, promote, shown_uri, tracking_uri, version_metrics

    uri = tracking_uri(args.tracking_uri)
    client = open_client(uri)
    if args.command == "list":
        models = client.search_registered_models(f"name='{args.name}'" if args.name else None)
        if not models:
            print(f"no registered models in {shown_uri(uri)}" + (f" named {args.name}" if args.name else ""))
            return 0
        for model in sorted(models, key=lambda m: m.name):
            aliases = {}
            for alias, version in (model.aliases or {}).items():
                aliases.setdefault(str(version), []).append(alias)
            print(model.name)
            for version in sorted(client.search_model_versions(f"name='{model.name}'"), key=lambda v: int(v.version)):
                marks = f" @{',@'.join(aliases[str(version.version)])}" if str(version.version) in aliases else ""
                print(f"  version {version.version}{marks}  {version.tags.get('trainer.kind', '')}  "
                      f"{_short(version_metrics(client, version))}  from {version.tags.get('lineage.run_dir', '-')}")
        return 0
    if args.command == "show":
        version = find_version(client, args.reference)
        model = client.get_registered_model(version.name)
        aliases = sorted(alias for alias, v in (model.aliases or {}).items() if str(v) == str(version.version))
        print(f"{version.name} version {version.version}" + (f" (alias {', '.join(aliases)})" if aliases else ""))
        print(f"  source: {version.source}\n  mlflow run: {version.run_id}\n  description: {version.description}")
        print("  metrics:")
        for key, value in sorted(version_metrics(client, version).items()):
            print(f"    {key} = {value:.6g}")
        print("  lineage:")
        for key, value in sorted(version.tags.items()):
            print(f"    {key} = {value}")
        return 0
    version = promote(client, args.reference, args.alias, requirements)
    print(f"{version.name} version {version.version} is now {args.alias!r} in {shown_uri(uri)}")
    sys.stdout.flush()
    return 0
