"""The checks every schema's `__post_init__` uses: each raises ConfigError naming the field and what is allowed."""

from __future__ import annotations

from trainer.errors import ConfigError


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    require(value in allowed, key, f"{value!r} is not one of {', '.join(allowed)}")


def non_negative(value: float, key: str, what: str = "a count") -> None:
    require(value >= 0, key, f"must be >= 0 ({what}; 0 disables), got {value}")
