"""The sbatch script that `launcher=slurm` writes, checked without a cluster (no `slurm` mark, no fixture).

The golden file is the script for a 4-node x 8-GPU LoRA experiment; after an intended change to the template or
the renderer, rewrite it with `UPDATE_GOLDEN=1 pytest tests/slurm/test_sbatch_script.py` and review the diff.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_one_line_error, compose_config, run_cli

GOLDEN = Path(__file__).resolve().parent / "golden" / "llama-3.1-70b-lora-slurm-4x8.sbatch"
EXAMPLES = REPO / "slurm" / "examples"
# A config that validates on this machine: the tiny embedded model, 2 nodes x 1 CPU worker.
TINY = ("strategy=ddp", "train.micro_batch_size=4", "train.global_batch_size=8")


def _render(tmp_path: Path, *overrides: str) -> str:
    from launch.slurm_script import render_sbatch

    config = compose_config("launcher=slurm", f"run.dir={tmp_path / 'run'}", *overrides)
    return render_sbatch(config, python="/opt/venv/bin/python")


def _sbatch_lines(script: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_dry_run_of_a_4_node_8_gpu_lora_experiment_matches_the_golden_script(tmp_path):
    model_dir = tmp_path / "models" / "Llama-3.1-70B-Instruct"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "Say hi.", "output": "hi"}\n')
    run_dir = tmp_path / "run"
    env = {"TRAINER_MODELS_DIR": str(tmp_path / "models"), "TRAINER_DATA": str(data), "PATH": "/usr/bin:/bin"}
    result = run_cli("train", "experiment=llama-3.1-70b-lora-slurm-4x8", f"run.dir={run_dir}", "launcher.dry_run=true",
                     "launcher.partition=gpu", "launcher.account=llm-team", "launcher.qos=high",
                     "launcher.extra_sbatch=['--mail-type=END']", "launcher.python=python",
                     "launcher.setup=[module load cuda/12.4,source /opt/venvs/trainer/bin/activate]",
                     env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    script = result.stdout.replace(str(run_dir), "<RUN_DIR>")
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text(), "the script changed; if on purpose, rerun with UPDATE_GOLDEN=1"
    # A dry run writes what a submission would use, submits nothing, and names the way to submit it.
    assert (run_dir / "train.sbatch").read_text() == result.stdout
    assert (run_dir / "config.yaml").is_file() and not (run_dir / "slurm_job_id").exists()
    assert f"sbatch {run_dir}/train.sbatch" in result.stderr
    # The script is valid bash.
    assert subprocess.run(["bash", "-n", str(run_dir / "train.sbatch")]).returncode == 0


def test_the_script_asks_for_what_the_launcher_fields_say(tmp_path):
    script = _render(tmp_path, *TINY, "launcher.nodes=2", "launcher.partition=dev", "launcher.account=acct",
                     "launcher.qos=low", "launcher.constraint=a100", "launcher.exclusive=true", "launcher.time=30",
                     "launcher.mem=64G", "launcher.cpus_per_task=8", "launcher.signal_grace_s=90",
                     "launcher.extra_sbatch=['#SBATCH --reservation=r1','--mail-type=END']", "launcher.job_name=exp1")
    run_dir = tmp_path / "run"
    assert _sbatch_lines(script) == [
        "--job-name=exp1", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=8", "--mem=64G", "--time=30",
        "--partition=dev", "--account=acct", "--qos=low", "--constraint=a100", "--exclusive",
        f"--output={run_dir}/slurm-%j.out", "--open-mode=append", "--signal=B:USR1@90", "--requeue",
        "--reservation=r1", "--mail-type=END"]
    # One task per node running torchrun with a c10d rendezvous on the allocation's first node.
    assert 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in script
    assert "srun --nodes=2 --ntasks-per-node=1" in script and "--cpus-per-task=8" in script.split("srun ")[1]
    assert "--nnodes=2 --nproc_per_node=1" in script and "--rdzv_backend=c10d" in script
    assert "export PYTHON=/opt/venv/bin/python" in script


def test_no_requeue_and_no_time_signal_when_switched_off(tmp_path):
    lines = _sbatch_lines(_render(tmp_path, "launcher.max_requeues=0", "launcher.signal_grace_s=0"))
    assert "--no-requeue" in lines and "--requeue" not in lines
    assert not any(line.startswith("--signal") for line in lines)


def test_gpus_set_the_workers_per_node_and_one_node_uses_a_private_rendezvous(tmp_path):
    script = _render(tmp_path, "launcher.gpus_per_node=4", "strategy=ddp", "train.micro_batch_size=2",
                     "train.global_batch_size=8")
    assert "--gpus-per-node=4" in _sbatch_lines(script)
    assert "--standalone --nproc_per_node=4" in script and "--rdzv_backend" not in script


def test_deepspeed_backend_runs_one_deepspeed_launcher_per_node_from_a_hostfile(tmp_path):
    script = _render(tmp_path, "launcher.backend=deepspeed", "launcher.nodes=2", "launcher.nproc_per_node=2",
                     "strategy=zero2", "train.micro_batch_size=2", "train.global_batch_size=8")
    assert "-m deepspeed.launcher.runner" in script and '--no_ssh --node_rank="$SLURM_NODEID"' in script
    assert "sed 's/$/ slots=2/' >\"$RUN_DIR/hostfile\"" in script
    assert 'export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"' in script  # no GPUs asked for


def test_a_site_template_is_used_and_an_unknown_placeholder_is_named(tmp_path):
    from trainer.errors import UserError

    template = tmp_path / "site.sbatch"
    template.write_text("#!/bin/bash\n{{ sbatch_directives }}\nsrun {{ node_launcher }}\n")
    script = _render(tmp_path, f"launcher.template={template}")
    assert script.startswith("#!/bin/bash\n#SBATCH --job-name=") and "trainer.worker" in script
    template.write_text("{{ no_such_value }}\n")
    with pytest.raises(UserError, match="no_such_value"):
        _render(tmp_path, f"launcher.template={template}")


@pytest.mark.parametrize("override,fragments", [
    ("launcher.time=soon", ["launcher.time", "'soon'"]),
    ("launcher.time=1", ["launcher.signal_grace_s", "not shorter than the time limit"]),
    ("launcher.partition=gpu large", ["launcher.partition", "one word"]),
    ("launcher.extra_sbatch=['mail-type=END']", ["launcher.extra_sbatch", "sbatch option"]),
    ("launcher.backend=mpirun", ["launcher.backend", "torchrun"]),
    ("launcher.nodes=0", ["launcher.nodes", ">= 1"]),
    ("launcher.rdzv_port=80", ["launcher.rdzv_port", "1024"]),
    # The world size is nodes x workers per node, and the global batch must divide over it.
    ("launcher.nodes=4", ["train.global_batch_size", "8 x 4"]),
])
def test_bad_slurm_settings_fail_at_compose_time_with_one_line(override, fragments, tmp_path):
    result = run_cli("train", "launcher=slurm", "strategy=ddp", "train.micro_batch_size=8",
                     "train.global_batch_size=16", override, f"run.dir={tmp_path / 'run'}", timeout=60)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "run").exists()


def test_without_sbatch_on_path_the_error_says_what_to_do(tmp_path):
    result = run_cli("train", "launcher=slurm", f"run.dir={tmp_path / 'run'}", env={"PATH": "/nonexistent"},
                     timeout=60)
    assert_one_line_error(result, "sbatch", "dry_run")


@pytest.mark.parametrize("example", sorted(p.stem for p in (EXAMPLES / "launcher").glob("*.yaml")))
def test_every_site_example_composes_and_renders(example, tmp_path):
    from launch.slurm_script import render_sbatch

    nodes = 2
    config = compose_config(f"hydra.searchpath=[file://{EXAMPLES}]", f"launcher={example}",
                            f"launcher.nodes={nodes}", "strategy=fsdp", "train.micro_batch_size=1",
                            "train.global_batch_size=64", f"run.dir={tmp_path / 'run'}")
    launcher = config.launcher
    assert launcher.name == "slurm" and launcher.partition and launcher.time and launcher.gpus_per_node
    assert launcher.world_size == nodes * launcher.gpus_per_node
    lines = _sbatch_lines(render_sbatch(config))
    assert f"--partition={launcher.partition}" in lines and "--requeue" in lines
    # Examples start with the command that uses them.
    assert "trainer train" in (EXAMPLES / "launcher" / f"{example}.yaml").read_text().split("defaults:")[0]


# ------------------------------------------------------------------------------- the preemption protocol
# Stand-ins for Slurm's commands, so that the script's own logic runs here: the "training step" behaves like the
# workers (they stop and record the requeue code once the request file exists, else finish), `scontrol` reports a
# running job and records a requeue.
FAKE_SRUN = """#!/bin/bash
for _ in $(seq 40); do
    if [[ -e "$TRAINER_PREEMPT_FILE" ]]; then
        mkdir -p "$RUN_DIR/.workers"
        echo '{"rank": 0, "exit_code": 85, "message": "preempted"}' >"$RUN_DIR/.workers/rank-0.json"
        exit 1
    fi
    sleep 0.05
done
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
    "show hostnames") echo node1 ;;
    "show job") echo "JobId=$3 JobState=RUNNING Restarts=0" ;;
    *) echo "$*" >>"$FAKE_SCONTROL_LOG" ;;
esac
"""


def _start_script(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    """The rendered script, run by bash as Slurm would, against the stand-ins above."""
    (tmp_path / "run").mkdir(exist_ok=True)
    script = tmp_path / "run" / "train.sbatch"
    # The real interpreter: the script takes the run dir's lock with `$PYTHON -m trainer.run_lock` (cwd: this repo).
    script.write_text(_render(tmp_path, *overrides).replace("PYTHON=/opt/venv/bin/python", f"PYTHON={sys.executable}"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node1",
           "FAKE_SCONTROL_LOG": str(tmp_path / "scontrol.log")}
    return subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=REPO)


def test_a_signal_during_the_site_setup_still_checkpoints_and_requeues_the_job(tmp_path):
    """The trap is set before anything else runs, and the request waits in a file for workers not yet started."""
    started = tmp_path / "run" / "setup-started"
    proc = _start_script(tmp_path, f"launcher.setup=[touch {started},sleep 1]")
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "got SIGUSR1" in out and "requeueing (restart 1 of at most 3)" in out, out
    assert (tmp_path / "scontrol.log").read_text() == "requeue 7\n"
    script = (tmp_path / "run" / "train.sbatch").read_text()
    assert not [line for line in script.splitlines() if "scancel" in line and not line.lstrip().startswith("#")]


def test_a_request_answered_by_an_earlier_run_of_the_job_is_not_taken_for_a_new_one(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".preempt").write_text("SIGUSR1\n")
    proc = _start_script(tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "training finished" in out, out
    assert not (tmp_path / "scontrol.log").exists() and not (tmp_path / "run" / ".preempt").exists()


def test_a_job_on_a_run_dir_that_another_job_holds_is_refused_before_training(tmp_path):
    """The job script takes the run dir's lock (trainer/run_lock.py) for the job's life; held by another: exit 2."""
    from trainer.run_lock import RunLock

    with RunLock(str(tmp_path / "run")):
        proc = _start_script(tmp_path)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert f"trainer: run dir {tmp_path / 'run'} is in use by pid {os.getpid()}" in out, out
    assert "training finished" not in out and not (tmp_path / "run" / ".workers").exists()
