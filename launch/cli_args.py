"""The argument parser of the `trainer` subcommands that take options (export, generate, eval): a mistake is one
line naming the command and pointing at its --help, exit code 2 (trainer/cli.py), not argparse's usage dump."""

from __future__ import annotations

import argparse

from trainer.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"{self.prog.split()[-1]}: {message} (see `{self.prog} --help`)")
