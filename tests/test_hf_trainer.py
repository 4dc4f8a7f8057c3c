"""Every ds_configs JSON also works in HF Trainer (`TrainingArguments(deepspeed=path)`), 1 rank, once
`zero-trainer plan --write-ds-config` has sized the memory knobs it leaves "auto" for the model (accelerate refuses
an "auto" it cannot fill; HF fills its own batch, optimizer and bucket autos as before)."""

import json
import os
import subprocess

import pytest
from conftest import BIN, REPO, free_port, run_cli

from zero_trainer.ds_config import DS_CONFIG_DIR, available_ds_configs
from zero_trainer.ops import remove_shm_buffers

pytestmark = pytest.mark.multiproc


def test_every_ds_config_trains_in_hf_trainer(tmp_path):
    paths = []
    for name in available_ds_configs():
        path = tmp_path / "sized" / f"{name}.json"
        path.parent.mkdir(exist_ok=True)
        run_cli("plan", "--model", "debug", "--seq-len", "64", "--micro-batch", "4", "--precision", "fp32",
                "--gpus-per-node", "1", "--nvme", "1", "--ds-config", name, "--write-ds-config", path)
        sized, shipped = json.loads(path.read_text()), json.loads((DS_CONFIG_DIR / f"{name}.json").read_text())
        assert sized["train_batch_size"] == shipped["train_batch_size"] == "auto"  # HF's own autos stay
        paths.append(str(path))
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
