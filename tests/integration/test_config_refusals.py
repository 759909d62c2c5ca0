"""Config mistakes that used to pass silently or with an unhelpful message: each is one line naming the key and
what to do, exit 2, through the real CLI, before a run dir exists. About 1 minute."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import assert_one_line_error, run_cli

CASES = {
    "unquoted non-ASCII path": ("data.path=/data/ü.jsonl", ["data.path", "quote it", "'data.path=\"/data/ü.jsonl\"'"]),
    "a '+' key the schema lacks": ("+train.max_stepz=3", ["train.max_stepz", "did you mean train.max_steps?"]),
    "infinite lr": ("optim.lr=inf", ["optim.lr", "finite"]),
    "NaN weight decay": ("optim.weight_decay=nan", ["optim.weight_decay", "finite"]),
    "absurd max_steps": ("train.max_steps=100000000000", ["train.max_steps", "more than 1,000,000,000"]),
    "absurd max_seq_len": ("data.max_seq_len=100000000", ["data.max_seq_len", "more than 16,777,216"]),
    "negative keep_last": ("checkpoint.keep_last=-1", ["checkpoint.keep_last", "0 keeps all"]),
    "another PEFT method's key": ("peft=none peft.dropout=0", ["peft.dropout", "peft=lora, dora, qlora have it"]),
    "another objective's option": ("objective.name=dpo objective.orpo_nll=sequence",
                                   ["objective.orpo_nll", "objective.name=orpo, not dpo"]),
    "compile under DeepSpeed": ("strategy=zero2 launcher.nproc_per_node=2 train.compile=true",
                                ["train.compile", "strategy=single, ddp, fsdp, not zero2"]),
    "Liger kernels without the package": ("model.kernels=liger", ["model.kernels", "pip install -e '.[kernels]'"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_in_one_line(case, tmp_path):
    override, fragments = CASES[case]
    if "liger" in override and importlib.util.find_spec("liger_kernel"):
        pytest.skip("liger-kernel is installed here (a GPU machine): tests/gpu/ runs it")
    result = run_cli("train", f"run.dir={tmp_path / 'run'}", *override.split())
    assert_one_line_error(result, *fragments)
    assert "disables" not in result.stderr  # keep_last's message once said "0 keeps all; 0 disables"
    assert not (tmp_path / "run").exists()
