"""Multi-node runs: two "nodes" on loopback through configs/slurm_multi_node.sh, each with its own dataset cache;
--ddp_timeout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from datetime import timedelta
from pathlib import Path

from conftest import PYTHON, REPO_ROOT
from test_streaming import write_shards
from test_training import FAST

# srun of one task per node: SLURM_PROCID 0 and 1 at once, each node with its own datasets cache and log
FAKE_SRUN = """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
for id in 0 1; do
    SLURM_PROCID=$id HF_DATASETS_CACHE=$NODES/node$id/cache "$@" > $NODES/node$id.log 2>&1 &
done
rc=0; for job in $(jobs -p); do wait $job || rc=1; done; exit $rc
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_slurm_script_trains_on_two_nodes_each_building_its_own_cache(tmp_path):
    shards = write_shards(tmp_path / "shards")
    bin_dir, nodes = tmp_path / "bin", tmp_path / "nodes"
    bin_dir.mkdir()
    nodes.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(PYTHON).parent}:{os.environ['PATH']}", "NODES": str(nodes),
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "localhost", "GPUS_PER_NODE": "1", "ACCELERATE_USE_CPU": "1",
           "MAIN_PROCESS_PORT": str(free_port()), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    out = tmp_path / "run"
    cmd = ["bash", str(REPO_ROOT / "configs" / "slurm_multi_node.sh"), *FAST, "--dataset_name", str(shards),
           "--mixed_precision", "no", "--max_train_steps", "2", "--checkpointing_steps", "2", "--train_batch_size",
           "4", "--output_dir", str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    logs = {node: (nodes / f"{node}.log").read_text() for node in ("node0", "node1")}
    assert result.returncode == 0, logs["node0"][-3000:] + logs["node1"][-2000:]
    assert json.loads((out / "training_summary.json").read_text())["results"]["world_size"] == 2
    assert "cache is built on each node, by its local main process (--cache_dir is not shared)" in logs["node0"]
    for node in ("node0", "node1"):  # each node decoded the images into its own cache
        assert list((nodes / node / "cache").rglob("*.arrow")), node


def test_ddp_timeout_reaches_the_process_group(tmp_path):
    from hf_ddpm.trainer import Trainer
    from hf_ddpm.training_args import parse_training_args

    trainer = Trainer(parse_training_args([*FAST, "--output_dir", str(tmp_path / "o"), "--ddp_timeout", "77"]))
    assert trainer.accelerator.init_handler.timeout == timedelta(seconds=77)
