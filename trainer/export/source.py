"""What `trainer export` reads: a run dir, one of its checkpoints, or its final/ dir, resolved to a tensor reader.

A run dir exports its `final/` when the run finished (the trained model), else its newest committed checkpoint;
a checkpoint dir (`RUN/checkpoints/step-N`) exports that checkpoint, which must be committed and intact. The
run's frozen `config.yaml` says what was trained: the base model (`model.path`), the PEFT method, the precision.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from trainer.errors import UserError


@dataclass
class ExportSource:
    location: str  # the checkpoint or final/ dir read
    kind: str  # "checkpoint" | "final"
    run_dir: str
    config: object  # the run's frozen trainer.config.schema.Config
    reader: object  # DcpReader | DeepSpeedReader | SafetensorsReader
    description: str

    @property
    def peft(self) -> bool:
        return self.config.peft.name != "none"


def _run_dir_of(path: str) -> str | None:
    """The run dir a path belongs to: itself, or the grandparent of a checkpoint, or the parent of final/."""
    candidates = [path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))]
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "config.yaml")):
            return candidate
    return None


def open_source(path: str, log=print) -> ExportSource:
    from trainer.checkpoint import find_resumable, verify_checkpoint
    from trainer.config.frozen import load_frozen

    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise UserError(f"{path} does not exist: give a run dir or a checkpoint dir (RUN/checkpoints/step-N)")
    run_dir = _run_dir_of(path)
    if run_dir is None:
        raise UserError(f"{path} is not a run dir or inside one (no config.yaml beside it): give a run dir or a "
                        "checkpoint dir (RUN/checkpoints/step-N)")
    if path == run_dir:
        final = os.path.join(run_dir, "final")
        if os.path.isdir(final):
            path = final
        else:
            path = find_resumable(run_dir, warn=log)
            if path is None:
                raise UserError(f"{run_dir} has neither final/ nor a committed checkpoint to export")
    # A checkpoint carries the config it was trained with (trainer/checkpoint.py); older ones have only the run's.
    own = os.path.join(path, "run_config.yaml")
    config = load_frozen(own if os.path.isfile(own) else run_dir)
    peft = config.peft.name != "none"
    if os.path.basename(path) == "final":
        from trainer.export.checkpoint_reader import SafetensorsReader
        from trainer.weights import check_safetensors_files

        check_safetensors_files(path)
        return ExportSource(path, "final", run_dir, config, SafetensorsReader(path), f"{path} (the run's final model)")
    if not os.path.basename(path).startswith("step-"):
        raise UserError(f"{path} is neither a run dir, its final/, nor a checkpoint (RUN/checkpoints/step-N)")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise UserError(f"cannot export {path}: {problem}")
    with open(os.path.join(path, "trainer_state.json")) as fh:
        saved = json.load(fh)
    state_dir = os.path.join(path, "state")
    if not os.path.isfile(os.path.join(state_dir, ".metadata")):  # DeepSpeed writes *_states.pt, DCP a .metadata
        from trainer.export.checkpoint_reader import DeepSpeedReader

        reader = DeepSpeedReader(state_dir)
    else:
        from trainer.export.checkpoint_reader import DcpReader

        reader = DcpReader(state_dir)
    fmt = "deepspeed" if type(reader).__name__ == "DeepSpeedReader" else "dcp"
    description = (f"{path} (step {saved['trainer']['step']}, {fmt} checkpoint written by "
                   f"{saved.get('world_size', 1)} rank(s), {'PEFT ' + config.peft.name if peft else 'full fine-tune'})")
    source = ExportSource(path, "checkpoint", run_dir, config, reader, description)
    check_tensors(source)
    return source


def check_tensors(source: ExportSource) -> None:
    """The checkpoint's tensors must be the model its config describes (names and shapes of what trained): a
    mismatch would otherwise be written out as a broken model, or an adapter_config.json that lies about them."""
    import warnings

    import torch

    from trainer.adapters import apply_peft
    from trainer.model import load_model

    config = source.config
    try:
        with warnings.catch_warnings():  # library deprecation notices would break the one-line error below
            warnings.simplefilter("ignore")
            model = load_model(config.model, torch.float32, on_meta=True)
            if source.peft:
                model = apply_peft(model, config.peft)
    except UserError:
        raise
    except Exception:  # an architecture that cannot be built on the meta device: the export itself will tell
        return
    # Every tensor in the checkpoint must exist in the config's model with the same shape; under PEFT every trainable
    # tensor must be there too (a full checkpoint's frozen parameters may be absent: DeepSpeed keeps trained ones).
    known = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {spec.name: tuple(spec.shape) for spec in source.reader.specs}
    wrong = [f"{name} is {list(shape)}, the config's model has {list(known[name])}"
             for name, shape in found.items() if name in known and known[name] != shape]
    extra = [name for name in found if name not in known]
    missing = [name for name, p in model.named_parameters() if p.requires_grad and name not in found] \
        if source.peft else []
    problem = wrong[:1] or ([f"it holds {extra[0]} (and {len(extra) - 1} more), which the config's model has not"]
                            if extra else []) or (
        [f"{missing[0]} (and {len(missing) - 1} more) of the config's adapters are missing"] if missing else [])
    if problem:
        what = f"peft={config.peft.name}" + (f" r={config.peft.r}" if hasattr(config.peft, "r") else "")
        raise UserError(f"cannot export {source.location}: its tensors do not match the config it is read with "
                        f"({what}, model.path={config.model.path}): {problem[0]}; restore the run's config.yaml "
                        "(resume_history.jsonl lists every accepted change)")
