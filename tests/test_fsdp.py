"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on CPU with gloo: one CPO + MLE optimizer step of a tiny
Llama sharded over 2 processes, scored by seqcpo's log-probs with the LM head inside the forward (as the trainer
does for sharded weights), equals one process on the whole batch.

Why not through ``seqcpo train``: accelerate 1.15 turns ``--use_fsdp`` into DistributedType.FSDP only on an
accelerator (its AcceleratorState sets FSDP inside the MULTI_GPU/NPU/XPU/... branch); on CPU the run silently
becomes MULTI_CPU (plain DDP). That the trainer's FSDP path gives MULTI_CPU on CPU is asserted below, so a
future accelerate that allows FSDP on CPU shows up here. The trainer under FSDP2 is checked on a GPU (NOTES)."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_fully_shard_step_on_cpu_equals_one_process(tmp_path):
    from conftest import make_tiny_llama

    worker = os.path.join(HERE, "fsdp2_cpu_worker.py")
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
          worker, str(tmp_path / "two.pt")])
    _run([sys.executable, worker, str(tmp_path / "one.pt")])
    two = torch.load(tmp_path / "two.pt")
    one = torch.load(tmp_path / "one.pt")
    assert two["param_types"] == ["DTensor"]  # the weights really were sharded
    init = make_tiny_llama(seed=0).state_dict()
    update = sum(((one["state"][k] - init[k]) ** 2).sum() for k in init).sqrt()
    diff = sum(((one["state"][k] - two["state"][k]) ** 2).sum() for k in init).sqrt()
    assert update > 1e-3  # the step moved the weights
    assert diff / update < 1e-5


def test_accelerate_fsdp_on_cpu_is_plain_multi_cpu():
    """The limitation that keeps ``seqcpo train`` off FSDP on CPU (see the module docstring)."""
    env = {**ENV, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_USE_CPU": "true", "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port()}
    code = ("from accelerate import Accelerator; import torch.distributed as d; "
            "print(Accelerator(cpu=True).distributed_type); d.destroy_process_group()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("MULTI_CPU")
