"""User-facing errors: one line, exit code 2, no traceback.

Anything a user can fix (a config key, a data file, a missing path) raises `UserError`; the CLI prints
`trainer: <message>` and exits with `EXIT_USER_ERROR`. Bugs stay ordinary exceptions with tracebacks.
"""

EXIT_USER_ERROR = 2
# A worker that checkpointed after SIGUSR1/SIGTERM exits with this code so that a launcher (Slurm's
# batch script) knows to requeue the job rather than treat it as failed.
EXIT_REQUEUE = 85


class UserError(Exception):
    """A problem the user can fix; str(self) is the one line shown to them."""


class ConfigError(UserError):
    """An invalid config value. `key` is the dotted config key, e.g. `optim.lr`."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"config error: {key}: {message}")

    def under(self, prefix: str) -> "ConfigError":
        """The same error with its key placed under a parent section (`lr` -> `optim.lr`)."""
        return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.message)


class DataError(UserError):
    """A problem in a data file, located as `path:line`."""

    def __init__(self, path: str, line: int | None, message: str):
        self.path = path
        self.line = line
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {message}")
