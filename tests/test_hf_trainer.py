"""Every ds_configs JSON also works unchanged in HF Trainer (`TrainingArguments(deepspeed=path)`), 1 rank."""

import json
import os
import subprocess

import pytest
from conftest import BIN, REPO, free_port

from zero_trainer.ds_config import DS_CONFIG_DIR, available_ds_configs
from zero_trainer.ops import remove_shm_buffers

pytestmark = pytest.mark.multiproc


def test_every_ds_config_trains_in_hf_trainer(tmp_path):
    paths = [str(DS_CONFIG_DIR / f"{name}.json") for name in available_ds_configs()]
    port = free_port()
    try:
        proc = subprocess.run(
            [str(BIN / "deepspeed"), "--num_gpus", "1", "--master_port", str(port), "tests/hf_trainer_check.py",
             str(tmp_path), os.environ["ZERO_TRAINER_CACHE"], *paths],
            cwd=REPO, capture_output=True, text=True, timeout=900)
    finally:
        remove_shm_buffers(port)  # HF Trainer's ranks do not go through zero_trainer's release
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = {json.loads(line[7:])["config"]: json.loads(line[7:])
               for line in proc.stdout.splitlines() if line.startswith("RESULT ")}
    assert sorted(results) == sorted(paths)
    for path, result in results.items():
        name = os.path.basename(path)[: -len(".json")]
        assert result["stage"] == json.loads(open(path).read())["zero_optimization"]["stage"], name
        assert len(result["losses"]) == 6 and result["losses"][-1] < result["losses"][0], (name, result["losses"])
