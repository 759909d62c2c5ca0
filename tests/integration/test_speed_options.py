"""The speed paths give the plain path's losses: torch's fused AdamW (the default optimizer step, on CPU too) against
the per-parameter loop, and `train.compile=true` against eager layers through the real CLI (whose checkpoints must
not change either). The CUDA-only ones (Liger kernels, flash attention, compile on a GPU) are in tests/gpu/."""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics, read_summary, run_cli, train_losses

torch = pytest.importorskip("torch")

QUIET = ("eval.max_batches=1", "eval.generate_samples=0", "logger.progress=false", "logger.plot=false",
         "eval.every_n_steps=0", "train.max_steps=3", "train.micro_batch_size=4", "train.global_batch_size=8",
         "data.max_seq_len=256", "data.packing=true")


def test_the_default_adamw_is_fused_and_steps_like_the_per_parameter_loop():
    import copy
    from types import SimpleNamespace

    from trainer.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    reference = copy.deepcopy(model)
    cfg = SimpleNamespace(name="adamw", lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.1, layer_lr_decay=1.0)
    fused = build_optimizer(model, cfg)
    assert fused.defaults["fused"] is True
    loop = torch.optim.AdamW(param_groups(reference, 0.1), lr=1e-3, foreach=False, fused=False)
    x = torch.randn(8, 16)
    for _ in range(5):
        for net, optimizer in ((model, fused), (reference, loop)):
            net(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
# make test compiles the LoRA model (the common case: adapters inside compiled layers); full fine-tuning's compile
# runs in make test-all (65 s of inductor compilation on 2 cores)
@pytest.mark.parametrize("peft", [pytest.param("none", marks=pytest.mark.extended), "lora"])
def test_compiled_layers_train_to_the_eager_losses_and_save_the_same_checkpoint(peft, tmp_path):
    from safetensors import safe_open

    runs = {}
    for name, extra in (("eager", ()), ("compiled", ("train.compile=true",))):
        run_dir = tmp_path / name
        # LoRA without dropout: inductor draws dropout masks from its own RNG stream, not eager's
        no_dropout = ("peft.dropout=0",) if peft == "lora" else ()
        result = run_cli("train", f"run.dir={run_dir}", *QUIET, f"peft={peft}", *no_dropout, *extra, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = run_dir
        if extra:
            assert "train.compile: 4 decoder layers" in result.stderr
    expected, losses = train_losses(runs["eager"]), train_losses(runs["compiled"])
    assert sorted(losses) == [1, 2, 3]
    # The same forward and gradients, to fp32 rounding (inductor's kernels sum in their own order); from step 2 on,
    # Adam's first steps (about lr x the sign of each gradient entry) turn that rounding into a little more.
    assert losses[1] == pytest.approx(expected[1], rel=1e-5)
    norms = [{r["step"]: r["grad_norm"] for r in read_metrics(run_dir) if "grad_norm" in r}
             for run_dir in runs.values()]
    assert norms[1][1] == pytest.approx(norms[0][1], rel=1e-4)
    for step in (2, 3):
        assert losses[step] == pytest.approx(expected[step], rel=2e-3), f"step {step}"
    assert read_summary(runs["compiled"])["status"] == "completed"
    weights = "model.safetensors" if peft == "none" else "adapter_model.safetensors"
    names = {}
    for name, run_dir in runs.items():
        with safe_open(str(run_dir / "final" / weights), "pt") as fh:
            names[name] = set(fh.keys())
    assert names["compiled"] == names["eager"]  # no "_orig_mod." in the saved names: it loads anywhere
