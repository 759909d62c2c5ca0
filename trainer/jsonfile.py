"""Reading the JSON files a user hands us (config.json, adapter_config.json, safetensors indexes, tokenizer.json).

One reader so that a damaged file is always the same one-line error naming the file, line and column, never a
traceback from deep inside an export or a merge.
"""

from __future__ import annotations

import json
import os
from typing import Any

from trainer.errors import UserError


def read_json(path: str) -> Any:
    """Parsed contents of `path`; UserError if it is missing or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f"{path}:{err.lineno}" if isinstance(err, json.JSONDecodeError) else path
        detail = f"{err.msg}, column {err.colno}" if isinstance(err, json.JSONDecodeError) else str(err)
        raise UserError(f"{where}: not valid JSON ({detail}); the file is damaged or was not written completely") \
            from None


def read_json_in(directory: str, name: str, missing: str) -> dict:
    """`directory/name` parsed as a JSON object; `missing` is the one-line error when the file is absent."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise UserError(missing)
    value = read_json(path)
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
