"""Silence the third-party messages that every run would print and that ask nothing of the user.

Each is matched narrowly (logger name or warning text and category), so that anything else -- a new deprecation,
a real failure -- still shows. Called first thing by the CLI and by every worker, before the libraries load.
"""

from __future__ import annotations

import logging
import warnings

# bitsandbytes on a CPU with AVX512-BF16 tries to fetch an optional faster 4-bit kernel from the Hugging Face hub at
# import and logs a warning when it cannot (no network, or an untrusted repository); its own kernel is used instead.
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)
# transformers' deprecation notices about its own internals, raised from inside transformers/PEFT calls we do not
# make ourselves (gradient checkpointing's old property name, the legacy cache argument).
QUIET_FUTURE_WARNINGS = (r".*`is_gradient_checkpointing` is deprecated.*",
                         r"`past_key_values` is deprecated.*Use `cache` instead")
# transformers' own generation code reads the legacy `past_key_values` output name, and then logs this notice.
QUIET_LOG_MESSAGES = {"transformers.utils.generic": "`past_key_values`/`cache_params` are deprecated"}


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def silence_known_harmless_messages() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, fragment in QUIET_LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(_DropMessage(fragment))
    for pattern in QUIET_FUTURE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
