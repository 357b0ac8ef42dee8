"""``bundles/mris/configs/multi_gpu_train.json`` under torchrun: 2 CPU processes, gloo backend.

Checks that both ranks train (DistributedDataParallel + the distributed SubjectVisitSampler), that rank 0
alone validates and saves, and that the saved weights are the DDP-synchronised ones (loadable into the
plain network).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "mris" / "configs"


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is required")
def test_torchrun_two_cpu_processes_gloo(tiny_cohort, tmp_path):
    from pipeline.mris.engine import make_network

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run", "training",
        "--config_file", f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']",
        "--logging_file", str(CONFIGS / "logging.conf"), "--bundle_root", str(tmp_path),
        "--manifest", str(Path(tiny_cohort[0]) / "manifest.csv"), "--epochs", "2", "--batch_size", "4",
        "--num_workers", "0", "--val_fraction", "0.0", "--image_size", "32", "--widen_factor", "0.125",
        "--draws_per_epoch", "2", "--split_fractions", "{'database': 1.0, 'downstream': 0.0, 'test': 0.0}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    # both ranks ran the trainer; only rank 0 validated
    assert len(re.findall(r"SupervisedTrainer - INFO - Engine run resuming from iteration 0", log)) == 2, log[-3000:]
    assert len(re.findall(r"Epoch\[\d\] Metrics -- val_R1", log)) == 2  # 2 epochs x rank 0 only
    final = torch.load(tmp_path / "models" / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    assert final["trainer"]["max_epochs"] == 2 and final["trainer"]["iteration"] == 2  # 8 draws / 2 ranks / 4
    net = make_network("combined", widen_factor=0.125)
    state = final["model"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    net.load_state_dict(state)  # the DDP wrapper's weights load into the plain network
    assert (tmp_path / "models" / "model.pt").is_file()
