"""The dev cluster behaves like the Slurm features the framework relies on.

Each test submits real jobs to the two emulated nodes that ``slurm_cluster`` starts and waits for
them with a bounded timeout. Timings (submission to start, requeue latency) are printed; run with
``-s`` to see them.
"""

from __future__ import annotations

import socket
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = pytest.mark.slurm


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sinfo_shows_two_idle_nodes_whose_names_resolve(slurm_cluster: SlurmCluster) -> None:
    out = slurm_cluster.run(["sinfo", "-h", "-N", "-o", "%N %t"]).stdout
    states = dict(line.split() for line in out.strip().splitlines())
    assert states == {node: "idle" for node in slurm_cluster.nodes}
    assert len(states) == 2
    # Jobs take MASTER_ADDR from the node list, so every node name must be a usable address.
    for node in states:
        assert socket.getaddrinfo(node, None), node


def test_batch_job_completes_and_writes_its_output(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out_file = tmp_path / "hello.out"
    submitted = time.time()
    job_id = slurm_cluster.sbatch(
        f"--output={out_file}", wrap='echo "started=$(date +%s.%N) job=$SLURM_JOB_ID node=$SLURMD_NODENAME"'
    )
    info = slurm_cluster.wait_for_job(job_id, timeout=30)
    assert info["JobState"] == "COMPLETED", info
    assert info["ExitCode"] == "0:0"
    fields = dict(word.split("=", 1) for word in out_file.read_text().split())
    assert fields["job"] == str(job_id)
    assert fields["node"] in slurm_cluster.nodes
    print(f"\nsbatch -> job running: {float(fields['started']) - submitted:.2f} s")


def test_two_node_job_runs_one_task_on_each_node(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out_file = tmp_path / "two-nodes.out"
    script = textwrap.dedent(
        f"""\
        #!/bin/bash
        #SBATCH --nodes=2 --ntasks-per-node=1 --output={out_file}
        srun bash -c 'echo "task nodeid=$SLURM_NODEID procid=$SLURM_PROCID node=$SLURMD_NODENAME"'
        """
    )
    job_id = slurm_cluster.sbatch(script=script)
    info = slurm_cluster.wait_for_job(job_id, timeout=30)
    assert info["JobState"] == "COMPLETED", info
    tasks = [
        dict(w.split("=", 1) for w in line.split()[1:])
        for line in out_file.read_text().splitlines()
        if line.startswith("task ")
    ]
    assert sorted(t["nodeid"] for t in tasks) == ["0", "1"]
    assert sorted(t["procid"] for t in tasks) == ["0", "1"]
    assert sorted(t["node"] for t in tasks) == sorted(slurm_cluster.nodes)


def test_usr1_requeue_runs_the_job_again(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """The preemption path: signal the batch script, it requeues itself, Slurm runs it again."""
    out_file = tmp_path / "requeue.out"
    # `sleep & wait` instead of a plain sleep: bash runs a trap only between commands, and `wait`
    # returns as soon as a signal arrives.
    script = textwrap.dedent(
        f"""\
        #!/bin/bash
        #SBATCH --requeue --open-mode=append --output={out_file}
        echo "run restart_count=${{SLURM_RESTART_COUNT:-0}} at=$(date +%s.%N)"
        if [ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ]; then echo "second run done"; exit 0; fi
        trap 'echo "got USR1"; scontrol requeue "$SLURM_JOB_ID"; exit 0' USR1
        echo "waiting for USR1"
        for _ in $(seq 120); do sleep 0.5 & wait $!; done
        echo "no signal came"
        exit 1
        """
    )
    job_id = slurm_cluster.sbatch(script=script)
    slurm_cluster.wait_for_text(out_file, "waiting for USR1", timeout=30)

    signalled = time.time()
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", str(job_id)])
    content = slurm_cluster.wait_for_text(out_file, "second run done", timeout=45)
    info = slurm_cluster.wait_for_job(job_id, timeout=30)

    assert info["JobState"] == "COMPLETED", info
    assert info["Restarts"] == "1", info
    runs = [line for line in content.splitlines() if line.startswith("run ")]
    assert [r.split()[1] for r in runs] == ["restart_count=0", "restart_count=1"], content
    assert "got USR1" in content
    restarted = float(runs[1].split("at=")[1])
    print(f"\nUSR1 -> requeued job running again: {restarted - signalled:.2f} s")


def test_gloo_all_reduce_across_two_nodes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """The multi-node wiring the launcher uses: MASTER_ADDR from the node list, one rank per node."""
    pytest.importorskip("torch")
    worker = tmp_path / "all_reduce.py"
    worker.write_text(
        textwrap.dedent(
            """\
            import os

            import torch
            import torch.distributed as dist

            rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
            dist.init_process_group("gloo", rank=rank, world_size=world)  # env:// MASTER_ADDR/PORT
            value = torch.tensor([float(rank + 1)])
            dist.all_reduce(value)
            print(f"rank={rank} node={os.environ['SLURMD_NODENAME']} sum={value.item():g}", flush=True)
            dist.destroy_process_group()
            """
        )
    )
    out_file = tmp_path / "all_reduce.out"
    script = textwrap.dedent(
        f"""\
        #!/bin/bash
        #SBATCH --nodes=2 --ntasks-per-node=1 --output={out_file}
        export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
        export MASTER_PORT={_free_port()}
        echo "MASTER_ADDR=$MASTER_ADDR"
        srun {sys.executable} {worker}
        """
    )
    job_id = slurm_cluster.sbatch(script=script)
    info = slurm_cluster.wait_for_job(job_id, timeout=60)
    content = out_file.read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{content}"
    results = sorted(line for line in content.splitlines() if line.startswith("rank="))
    assert len(results) == 2, content
    # ranks 0 and 1 contribute 1 + 2
    assert all(line.endswith("sum=3") for line in results), content
    assert {line.split()[1].split("=", 1)[1] for line in results} == set(slurm_cluster.nodes)
    master = content.splitlines()[0].split("=", 1)[1]
    assert master in slurm_cluster.nodes
