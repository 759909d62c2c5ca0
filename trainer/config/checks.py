"""The checks every schema's `__post_init__` uses: each raises ConfigError naming the field and what is allowed."""

from __future__ import annotations

from trainer.errors import ConfigError


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    if value in allowed:
        return
    from trainer.config.suggest import suggest_option

    close = suggest_option(str(value), [str(option) for option in allowed])
    hint = f"; did you mean {close}?" if close else ""
    raise ConfigError(key, f"{value!r} is not one of {', '.join(allowed)}{hint}")


def non_negative(value: float, key: str, what: str = "a count", zero: str = "disables") -> None:
    """`zero` says what 0 means for this key, so the message never contradicts the key's own meaning of 0."""
    import math

    require(math.isfinite(value), key, f"must be a finite number, got {value}")
    require(value >= 0, key, f"must be >= 0 ({what}; 0 {zero}), got {value}")


def at_most(value: float, limit: float, key: str, why: str) -> None:
    """An upper bound that catches a slipped digit (a value no run could reach) before anything is allocated."""
    require(value <= limit, key, f"{value} is more than {limit:,} ({why}); check the number")


def finite_floats(section: object, prefix: str) -> None:
    """Every float field of a dataclass (and of those nested in it) is finite: `optim.lr=inf` or `nan` passes a
    `> 0` check and would only show as a NaN loss after the model has loaded."""
    import dataclasses
    import math

    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        key = f"{prefix}.{field.name}" if prefix else field.name
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value}")
        if dataclasses.is_dataclass(value):
            finite_floats(value, key)
        if isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                if isinstance(item, float) and not math.isfinite(item):
                    raise ConfigError(f"{key}[{index}]", f"must be a finite number, got {item}")
                if dataclasses.is_dataclass(item):
                    finite_floats(item, f"{key}[{index}]")
