"""What a person reads during and after a run: the progress line, metrics.jsonl, the end-of-run table, the loss
curve, and the permissions of the files a run writes."""

from __future__ import annotations

import io
import json
import os
import time

import pytest


def test_the_eta_at_step_1_comes_from_the_step_time_not_zero():
    from trainer.log import ProgressLine

    stream = io.StringIO()
    line = ProgressLine(stream)
    line.update(1, 11, {"step_seconds": 2.0, "loss": 3.0})
    assert "eta 00:20" in stream.getvalue()  # 10 steps left at 2 s each


def test_every_metrics_record_carries_its_wall_clock_time(tmp_path):
    from trainer.log import JsonlWriter

    writer = JsonlWriter(str(tmp_path / "metrics.jsonl"))
    before = time.time()
    writer.write({"step": 1, "loss": 2.5})
    writer.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["step"] == 1 and before - 1 <= record["time"] <= time.time() + 1


def test_the_end_of_run_table_keeps_large_figures_apart():
    from trainer.recipe import _figure

    cells = [_figure(6330435.80792587), _figure(206.9894), _figure(None)]
    assert cells == ["6.33e+06", "206.9894", "-"]

    from trainer.recipe import result_table

    table = result_table({"perplexity": 6330435.80792587, "loss": 15.66}, {"perplexity": 206.9894, "loss": 5.33,
                                                                        "exact_match": 0.4})
    assert len({len(line) for line in table}) == 1  # every row as wide as the header: columns line up
    assert [line.split() for line in table] == [["metric", "before", "after"], ["exact_match", "-", "0.4000"],
                                                ["loss", "15.6600", "5.3300"], ["perplexity", "6.33e+06", "206.9894"]]


def test_the_loss_curve_has_panels_for_the_learning_rate_and_forgetting(tmp_path):
    from PIL import Image

    from trainer.plots import plot_loss_curve, smoothed

    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 10.0 / s, "lr": 1e-3 * (1 - s / 50)} for s in range(1, 51)]
    rows += [{"step": s, "eval_loss": 8.0 / s, "eval_forgetting_loss": 1.0 + s / 100} for s in (0, 25, 50) if s]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"step": r["step"], "loss": r["loss"]}) + "\n" for r in rows if "loss" in r))
    wide = plot_loss_curve(str(metrics), str(tmp_path / "wide.png"), title="my-run")
    narrow = plot_loss_curve(str(plain), str(tmp_path / "narrow.png"))
    assert Image.open(wide).size[0] > Image.open(narrow).size[0]  # the side panels are drawn
    assert smoothed([4.0, 4.0, 4.0]) == pytest.approx([4.0, 4.0, 4.0])  # no pull towards zero at the start

    # What is drawn: loss on a log scale (it spans 20x), evaluations as markers, the LR and forgetting panels, and
    # the run's name with its figures as the title.
    from trainer.plots import _read, loss_figure

    figure = loss_figure(_read(str(metrics)), "my-run")
    loss_ax, lr_ax, forgetting_ax = figure.axes
    assert loss_ax.get_yscale() == "log"
    eval_line = next(line for line in loss_ax.get_lines() if line.get_label() == "eval loss")
    assert eval_line.get_marker() == "o" and list(eval_line.get_xdata()) == [25, 50]
    assert (lr_ax.get_title(), forgetting_ax.get_title()) == ("learning rate", "forgetting-data loss")
    assert figure._suptitle.get_text() == "my-run  |  train loss 10 -> 0.2 in 50 steps  |  eval loss 0.16"
    flat = loss_figure(_read(str(plain)), None)
    assert len(flat.axes) == 1 and flat.axes[0].get_yscale() == "log"  # 10 -> 0.2 is still wide


def test_written_weights_follow_the_umask(tmp_path):
    import torch
    from safetensors.torch import save_file

    from trainer.weights import apply_umask

    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))  # safetensors' own mode: 0600
    old = os.umask(0o022)
    try:
        apply_umask(str(tmp_path))
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "model.safetensors").st_mode & 0o777) == 0o644


def test_tensorboard_gets_the_scalars_the_config_and_the_hyperparameters(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.config.schema import LoggerConfig
    from trainer.log import RunLogger

    cfg = LoggerConfig(progress=False, tensorboard=True)
    logger = RunLogger(cfg, str(tmp_path), "my-run", {"optim": {"lr": 2e-4}, "peft": {"name": "lora"}})
    logger.log_train(1, {"loss": 2.5, "lr": 2e-4})
    logger.log_eval(1, {"loss": 2.4})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss", "eval/loss"} <= set(tags["scalars"])
    assert any(tag.startswith("config") for tag in tags["tensors"])  # the config's text
    assert events.Scalars("train/loss")[0].value == 2.5
    # The HParams tab lists this run's optim.lr and peft.name, with their values (the plugin's own protos).
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams = EventAccumulator(str(tmp_path / "tensorboard")).Reload().PluginTagToContent("hparams")
    written = {tag.rsplit("/", 1)[-1]: plugin_data_pb2.HParamsPluginData.FromString(raw)
               for tag, raw in hparams.items()}
    assert {info.name for info in written["experiment"].experiment.hparam_infos} >= {"optim.lr", "peft.name"}
    values = written["session_start_info"].session_start_info.hparams
    assert values["optim.lr"].number_value == pytest.approx(2e-4) and values["peft.name"].string_value == "lora"


def test_samples_and_the_final_adapter_reach_tensorboard_and_wandb_offline(tmp_path, monkeypatch):
    """Generated answers go to samples.jsonl, a TensorBoard text table and a W&B table; final/ becomes a W&B model
    artifact. W&B in offline mode writes what it would upload under RUN/wandb/ (the real wandb, no server)."""
    import dataclasses

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.config.schema import LoggerConfig
    from trainer.log import RunLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # offline artifacts are staged here
    final = tmp_path / "final"
    final.mkdir()
    (final / "adapter_config.json").write_text('{"r": 16}')
    (final / "adapter_model.safetensors").write_bytes(b"weights")
    cfg = LoggerConfig(progress=False, tensorboard=True)
    cfg = dataclasses.replace(cfg, wandb=dataclasses.replace(cfg.wandb, mode="offline"))
    logger = RunLogger(cfg, str(tmp_path), "my run/1", {"optim": {"lr": 2e-4}})
    logger.log_samples(4, [{"prompt": "Which | creature?", "answer": "the fox", "reference": "the fox"}])
    logger.log_final_model(str(final), "adapter")
    logger.log_final_model(str(final), "model")  # a full model: recorded by reference, not uploaded
    logger.close()

    record = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])
    assert record == {"step": 4, "prompt": "Which | creature?", "answer": "the fox", "reference": "the fox"}
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    text = events.Tensors("samples/text_summary")[0]
    assert text.step == 4 and b"Which \\| creature?" in text.tensor_proto.string_val[0]
    tables = list((tmp_path / "wandb").rglob("samples_*.table.json"))
    assert tables and json.loads(tables[0].read_text())["data"] == [[4, "Which | creature?", "the fox", "the fox"]]
    run_file = next((tmp_path / "wandb").rglob("run-*.wandb")).read_bytes()
    assert b"my-run-1-adapter" in run_file and b"adapter_model.safetensors" in run_file
    assert b"my-run-1-model" in run_file and f"file://{final}".encode() in run_file
