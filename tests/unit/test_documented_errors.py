"""Every error example the README and docs/ show is what the code says: each `$ trainer ...` command in a fenced
block that is followed by a `trainer: ...` line is run as written (from the block's `$ cd DIR`, relative to the
repository), and must exit with code 2 and end its stderr with exactly that line, every line a `trainer:` line (no
traceback), leaving no run dir behind. Inline examples must appear in such a block, so none goes unchecked."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Example:
    source: str  # file:line of the expected line
    cwd: Path
    command: str
    expected: str


def _examples() -> list[Example]:
    found = []
    for doc in DOCS:
        in_block, cwd, command = False, REPO, None
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_block, cwd, command = not in_block, REPO, None
                continue
            if not in_block:
                continue
            if line.startswith("$ cd "):
                cwd = REPO / line[len("$ cd "):].strip()
            elif line.startswith("$ trainer "):
                command = line[len("$ trainer "):].strip()
            elif line.startswith("trainer: ") and command is not None:
                found.append(Example(f"{doc.relative_to(REPO)}:{number}", cwd, command, line))
                command = None  # one documented line per command
    return found


EXAMPLES = _examples()


def test_every_inline_error_example_is_one_the_blocks_run():
    """An example quoted in prose (`trainer: ...`) is checked through the block that shows its command; only
    templates with placeholders (`...`, `step N`) are exempt."""
    shown = {example.expected for example in EXAMPLES}
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for quoted in re.findall(r"`(trainer: [^`]+)`", line):
                if "..." in quoted:
                    continue
                assert quoted in shown, f"{doc.relative_to(REPO)}:{number}: {quoted!r} is shown without its command"
    assert len(EXAMPLES) >= 15  # the README's config mistakes and docs/data.md's bad records


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.source for e in EXAMPLES])
def test_documented_error_example(example, tmp_path):
    args = shlex.split(example.command)
    if args[0] == "train":
        args.append(f"run.dir={tmp_path / 'run'}")
    if args[0] in ("train", "data"):
        args.append(f"paths.cache_dir={tmp_path / 'cache'}")
    result = run_cli(*args, timeout=180, cwd=str(example.cwd))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (example.source, result.returncode, result.stderr[-2000:])
    assert lines and lines[-1] == example.expected, (example.source, lines[-1:])
    assert all(line.startswith("trainer: ") for line in lines), (example.source, result.stderr[-2000:])
    assert not (tmp_path / "run").exists()
