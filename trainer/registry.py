"""The model registry on MLflow: a finished run's result as a registered model version, with its lineage.

Embedded by default (no server): a SQLite store and a local artifact root under <paths.runs_dir>/registry/. Any
tracking URI MLflow accepts (a team's `http://mlflow:5000`, another SQLite file) works the same, given with
--tracking-uri, registry.tracking_uri or MLFLOW_TRACKING_URI.

One registration = one MLflow run (the config as params, the eval figures as metrics, config.yaml, summary.json and
lineage.json as artifacts under run/, the model under model/) and one new version of the registered model whose
source is that model/ artifact. The version's tags carry the lineage (base model hashes, data hashes and pipeline
fingerprint, code version and commit, W&B run id), so MLflow's own UI and client show where it came from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass

from trainer.errors import UserError
from trainer.gate import Requirement, first_failure

EXPERIMENT = "trainer"
REFERENCE_PREFIX = "registry:"
_PARAMS_PER_BATCH = 100
_PARAM_VALUE_LIMIT = 6000  # MLflow's limit for a param value


def tracking_uri(explicit: str | None = None, runs_dir: str = "runs") -> str:
    """The store to use: the one given, else MLFLOW_TRACKING_URI, else the embedded SQLite store. A plain
    directory stands for an embedded store kept in it."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or os.path.join(runs_dir, "registry")
    if "://" in uri or uri.startswith("sqlite:") or uri in ("databricks",):
        return uri
    return "sqlite:///" + os.path.join(os.path.abspath(uri), "mlflow.db")


def shown_uri(uri: str) -> str:
    """The URI without user:password@ (a credential in MLFLOW_TRACKING_URI must not reach a log)."""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def _artifact_root(uri: str) -> str | None:
    """An embedded store keeps its artifacts beside the database; a server decides for itself."""
    if uri.startswith("sqlite:///"):
        return "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "artifacts")
    return None


def open_client(uri: str):
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///"):]), exist_ok=True)
    # MLflow retries an unreachable server 7 times with growing waits (minutes); a person at a prompt wants to know.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    from mlflow import MlflowClient

    # After the import, which sets up MLflow's loggers: "Creating initial MLflow database tables..." is not news.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def run_metrics(summary: dict) -> dict[str, float]:
    """The figures a gate can check, named as the registry records them: eval.<metric> (after training),
    eval_before.<metric>, train_loss_first/last, tokens_per_second, steps."""
    metrics = {f"eval.{k}": v for k, v in (summary.get("eval_after") or {}).items()}
    metrics.update({f"eval_before.{k}": v for k, v in (summary.get("eval_before") or {}).items()})
    for key in ("train_loss_first", "train_loss_last", "tokens_per_second", "steps"):
        if isinstance(summary.get(key), (int, float)):
            metrics[key] = summary[key]
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _finished_run(run_dir: str) -> tuple[dict, str]:
    """(summary, final dir) of a completed run; one line otherwise."""
    from trainer.jsonfile import read_json_in

    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise UserError(f"register: {run_dir} is not a run dir (no config.yaml)")
    summary = read_json_in(run_dir, "summary.json", f"register: {run_dir} has not finished (no summary.json): "
                           f"finish it with `trainer train run.dir={run_dir}` first")
    final = os.path.join(run_dir, "final")
    if summary.get("status") != "completed" or not os.path.isdir(final):
        raise UserError(f"register: {run_dir} did not complete (status {summary.get('status')!r}): only a finished "
                        f"run's final/ is registered; finish it with `trainer train run.dir={run_dir}`")
    from trainer.weights import check_safetensors_files

    check_safetensors_files(final)
    return summary, final


def _combined_hash(files: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(files[path].encode())
    return digest.hexdigest()


def lineage_tags(lineage: dict, run_dir: str, wandb_id: str | None) -> dict[str, str]:
    """The lineage as flat string tags (what MLflow's UI lists beside a version)."""
    tags = {"lineage.run_dir": os.path.abspath(run_dir)}
    for key, value in (lineage.get("base_model") or {}).items():
        if value is not None:
            tags[f"lineage.base_model.{key}"] = str(value)
    for key, source in (lineage.get("data") or {}).items():
        tags[f"lineage.data.{key}"] = source["path"]
        if source.get("files"):
            tags[f"lineage.data.{key}.sha256"] = _combined_hash(source["files"])
    if lineage.get("data_fingerprint"):
        tags["lineage.data_fingerprint"] = lineage["data_fingerprint"]
    for key, value in (lineage.get("code") or {}).items():
        tags[f"lineage.code.{key}"] = str(value)
    if wandb_id:
        tags["lineage.wandb_run_id"] = wandb_id
    return tags


def _read_wandb_id(run_dir: str) -> str | None:
    from trainer.log import WANDB_ID_FILE

    path = os.path.join(run_dir, WANDB_ID_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return fh.read().strip() or None


def _lineage(run_dir: str, config_path: str) -> dict:
    """RUN/lineage.json as training recorded it; a run from before lineage.json existed gets it computed now, from its
    frozen config (whose data files may since have moved: then their paths are kept, without hashes)."""
    from trainer.config.frozen import load_frozen
    from trainer.lineage import build_lineage, code_identity, model_identity, read_lineage

    recorded = read_lineage(run_dir)
    if recorded is not None:
        return recorded
    try:
        lineage = build_lineage(load_frozen(config_path), None)
    except UserError:  # a check of the config against today's files (e.g. data.path) fails: record what is known
        from trainer.run_identity import flatten, read_config_dict

        flat = flatten(read_config_dict(config_path))
        data = {key: {"path": value, "files": {}} for key, value in flat.items()
                if value and (key.endswith("_path") or key.endswith(".path")) and key.split(".")[0] in (
                    "data", "eval", "regularize")}
        lineage = {"base_model": model_identity(flat.get("model.path")), "data": data, "data_fingerprint": None,
                   "code": code_identity()}
    lineage["recorded"] = "at registration (the run predates lineage.json; its data may have changed since)"
    return lineage


def _log_params(client, run_id: str, config_dict: dict) -> None:
    from mlflow.entities import Param

    from trainer.run_identity import flatten

    params = [Param(key, str(value)[:_PARAM_VALUE_LIMIT]) for key, value in flatten(config_dict).items()]
    for start in range(0, len(params), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[start:start + _PARAMS_PER_BATCH])


@dataclass
class Registered:
    name: str
    version: str
    aliases: list[str]
    run_id: str
    source: str
    uri: str
    tags: dict


def register_run(run_dir: str, name: str, uri: str, aliases: list[str] = (), requirements: list[Requirement] = (),
                 merged: bool = False, description: str | None = None, log=print) -> Registered:
    """Register a finished run's final/ (or its adapter merged into the base) as a new version of `name`."""
    from trainer.run_identity import read_config_dict

    run_dir = os.path.abspath(run_dir)
    summary, final = _finished_run(run_dir)
    metrics = run_metrics(summary)
    failure = first_failure(list(requirements), metrics)
    if failure:
        raise UserError(f"register: {run_dir} is not registered: {failure}")
    config_path = os.path.join(run_dir, "config.yaml")
    # The plain frozen config: a typed load would check it against today's files (data moved since is no reason to
    # refuse a finished run); the lineage training recorded names what it was made from.
    config = read_config_dict(config_path)
    is_adapter = os.path.isfile(os.path.join(final, "adapter_config.json"))
    if merged and not is_adapter:
        raise UserError(f"register --merged: {run_dir} trained the full model, there is no adapter to merge: "
                        "register it without --merged")
    kind = "merged" if merged else ("adapter" if is_adapter else "model")
    lineage = _lineage(run_dir, config_path)
    tags = {**lineage_tags(lineage, run_dir, _read_wandb_id(run_dir)), "trainer.kind": kind,
            "trainer.peft": str((config.get("peft") or {}).get("name"))}
    client = open_client(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(
        EXPERIMENT, artifact_location=_artifact_root(uri))
    run = client.create_run(experiment_id, run_name=os.path.basename(run_dir), tags=tags)
    run_id = run.info.run_id
    try:
        _log_params(client, run_id, config)
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        for file in ("config.yaml", "summary.json", "lineage.json", "loss_curve.png"):
            path = os.path.join(run_dir, file)
            if os.path.isfile(path):
                client.log_artifact(run_id, path, "run")
        with tempfile.TemporaryDirectory(prefix="register-") as scratch:
            if lineage.get("recorded"):
                lineage_path = os.path.join(scratch, "lineage.json")
                with open(lineage_path, "w", encoding="utf-8") as fh:
                    json.dump(lineage, fh, indent=2)
                client.log_artifact(run_id, lineage_path, "run")
            model_dir = final
            if merged:
                from trainer.export import export

                model_dir = os.path.join(scratch, "merged")
                export(run_dir, "merged", model_dir, log=log)
            log(f"register: copying {kind} {model_dir} into the registry's artifacts")
            client.log_artifacts(run_id, model_dir, "model")
            # Beside the weights too, so the registered files say how they were trained (template, base) on their own.
            client.log_artifact(run_id, config_path, "model")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    if not _exists(client, name):
        client.create_registered_model(name, description=f"registered by trainer from {run_dir}")
    source = f"{run.info.artifact_uri}/model"
    version = client.create_model_version(name, source, run_id=run_id, tags=tags,
                                          description=description or _describe(kind, lineage, metrics))
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version.version)
    return Registered(name, str(version.version), list(aliases), run_id, source, uri, tags)


def _exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False


def _describe(kind: str, lineage: dict, metrics: dict) -> str:
    base = (lineage.get("base_model") or {}).get("path")
    data = ", ".join(source["path"] for source in (lineage.get("data") or {}).values())
    code = lineage.get("code") or {}
    commit = code.get("git_commit", "")[:12]
    shown = ("eval.exact_match", "eval.loss", "eval.forgetting_increase")
    figures = ", ".join(f"{key.removeprefix('eval.')} {metrics[key]:.4g}" for key in shown if key in metrics)
    return (f"{kind} of {base}, trained on {data or 'no local files'} with trainer {code.get('version')}"
            + (f" at {commit}" if commit else "") + (f"; {figures}" if figures else ""))


# ------------------------------------------------------------------------------------------------ reading back
def parse_reference(text: str) -> tuple[str, str | None, str | None]:
    """NAME@ALIAS, NAME/VERSION or NAME (its newest version) -> (name, alias, version)."""
    text = text.removeprefix(REFERENCE_PREFIX)
    if "@" in text:
        name, alias = text.split("@", 1)
        return name, alias, None
    name, sep, version = text.rpartition("/")
    if sep and version.isdigit():
        return name, None, version
    return text, None, None


def find_version(client, reference: str):
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_reference(reference)
    if not _exists(client, name):
        known = ", ".join(sorted(m.name for m in client.search_registered_models())) or "none yet"
        raise UserError(f"registry: no registered model {name!r} (registered: {known}); register one with "
                        f"`trainer register RUN --name {name}`")
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        if version:
            return client.get_model_version(name, version)
    except MlflowException:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise UserError(f"registry: {name} has no {what}; see `trainer registry show {name}`") from None
    versions = client.search_model_versions(f"name='{name}'")
    return max(versions, key=lambda v: int(v.version))


def version_metrics(client, version) -> dict[str, float]:
    return dict(client.get_run(version.run_id).data.metrics) if version.run_id else {}


def promote(client, reference: str, alias: str, requirements: list[Requirement]):
    """Point `alias` at a version, if its run's metrics pass the gate."""
    version = find_version(client, reference)
    failure = first_failure(list(requirements), version_metrics(client, version))
    if failure:
        raise UserError(f"registry promote: {version.name} version {version.version} does not become {alias!r}: "
                        f"{failure}")
    client.set_registered_model_alias(version.name, alias, version.version)
    return version


def fetch_version(reference: str, uri: str):
    """registry:NAME@ALIAS (or /VERSION): (the registered model's local files, fetched from the artifact store if
    remote; the version, with its lineage tags)."""
    import mlflow.artifacts

    version = find_version(open_client(uri), reference)
    return mlflow.artifacts.download_artifacts(artifact_uri=version.source, tracking_uri=uri), version
