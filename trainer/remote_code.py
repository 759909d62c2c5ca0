"""Python code that a model dir ships for transformers' Auto classes (`auto_map`), found before anything imports it.

transformers runs such code only with `trust_remote_code=True`; we decide that up front, from the user's own
setting (`model.trust_remote_code`, `trainer generate --trust-remote-code`), and say so in one line otherwise.
"""

from __future__ import annotations

import os

from trainer.errors import UserError
from trainer.jsonfile import read_json


def shipped_code(directory: str | None) -> str | None:
    """Which file of a model dir maps Auto classes onto Python files of its own, and to what; None if none does."""
    if not directory or not os.path.isdir(directory):
        return None
    for name in ("config.json", "tokenizer_config.json"):
        path = os.path.join(directory, name)
        data = read_json(path) if os.path.isfile(path) else {}
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if isinstance(auto_map, dict) and auto_map:
            targets = sorted({t for v in auto_map.values() for t in (v if isinstance(v, list) else [v]) if t})
            return f"{name} auto_map: {', '.join(targets)}"
    return None


def refuse_untrusted(directory: str | None, trusted: bool, how_to_trust: str) -> None:
    """UserError naming the shipped code unless `trusted`; `how_to_trust` says what the user would set."""
    shipped = None if trusted else shipped_code(directory)
    if shipped:
        raise UserError(f"{directory!r} ships its own Python code ({shipped}); it runs only with {how_to_trust}: "
                        "set that if you trust its source")
