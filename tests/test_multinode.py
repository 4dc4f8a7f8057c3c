"""`zero-trainer train --hostfile`: the DeepSpeed runner command it builds, the hostfile as DeepSpeed reads it, and
the preflight planning the hostfile's nodes as the ranks will. Nothing launches; the launch itself is
conftest.launch_ranks(launcher="two_nodes"), two nodes on this machine."""

import argparse
import os

import pytest
from deepspeed.launcher import runner

from zero_trainer.cli import build_parser, ranks_per_node
from zero_trainer.launch import launcher_command, multi_node, read_hostfile
from zero_trainer.plan import recipe_hardware
from zero_trainer.recipe import load_recipe

RANK_ARGS = ["--recipe", "/r/debug.yaml", "train.max_steps=2"]


def train_args(*flags) -> argparse.Namespace:
    return build_parser().parse_args(["train", "--recipe", "debug", *map(str, flags)])


@pytest.fixture
def hostfile(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# two nodes\nnode0 slots=2\n\nnode1 slots=2  # the second\n")
    return path


@pytest.mark.parametrize("flags, expected", [
    ([], {"no_ssh": False, "node_rank": -1, "master_addr": "", "launcher": "pdsh"}),
    (["--launcher", "openmpi", "--master-addr", "10.0.0.1"],
     {"no_ssh": False, "node_rank": -1, "master_addr": "10.0.0.1", "launcher": "openmpi"}),
    (["--no-ssh", "--node-rank", "1", "--master-addr", "127.0.0.1", "--master-port", "29511"],
     {"no_ssh": True, "node_rank": 1, "master_addr": "127.0.0.1", "launcher": "pdsh"}),
])
def test_launcher_command_is_deepspeeds_runner_flags(hostfile, flags, expected):
    """DeepSpeed's own parser reads the command as meant; no --num_gpus, which would replace every host's slots."""
    nodes = multi_node(train_args("--hostfile", hostfile, *flags))
    assert nodes.world_size == 4 and nodes.ranks_per_node == 2
    cmd = launcher_command(None, 29511, RANK_ARGS, nodes)
    assert "--num_gpus" not in cmd
    parsed = runner.parse_args(cmd[1:])
    assert parsed.hostfile == str(hostfile.absolute()) and parsed.num_gpus == -1 and parsed.num_nodes == -1
    assert {k: getattr(parsed, k) for k in expected} == expected
    assert parsed.master_port == 29511 and parsed.module and parsed.user_script == "zero_trainer.train"
    assert parsed.user_args == RANK_ARGS
    slots = runner.apply_num_nodes_and_gpus(runner.parse_inclusion_exclusion(
        runner.fetch_hostfile(parsed.hostfile), "", ""), parsed.num_nodes, parsed.num_gpus)
    assert {host: len(ids) for host, ids in slots.items()} == {"node0": 2, "node1": 2}


def test_launcher_command_without_hostfile_is_unchanged():
    cmd = launcher_command(2, 29512, RANK_ARGS)
    assert cmd[1:] == ["--num_gpus", "2", "--master_port", "29512", "--module", "zero_trainer.train", *RANK_ARGS]
    assert multi_node(train_args()) is None


@pytest.mark.parametrize("text", [
    "node0 slots=1\nnode1 slots=1\n",
    "# comment\n\n  worker-0 slots=8\nworker-1\tslots=8 # trailing\n",
    "10.0.0.1 slots=4 max_slots=4\n",
])
def test_hostfile_read_as_deepspeed_reads_it(tmp_path, text):
    path = tmp_path / "hosts"
    path.write_text(text)
    assert read_hostfile(path) == dict(runner._parse_hostfile(text.splitlines(keepends=True)))


def test_preflight_plans_the_hostfile_nodes_as_the_ranks_do(monkeypatch, hostfile):
    """cmd_train resolves at the hostfile's world size with its ranks per node (LOCAL_WORLD_SIZE, only while it
    plans); a rank started by DeepSpeed's launch.py (LOCAL_SIZE) sees the same hardware."""
    from zero_trainer import cli, launch, resolve

    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ZERO_TRAINER_PREFLIGHT", "")  # cmd_train sets it: restored after the test
    seen, launched = [], []
    monkeypatch.setattr(resolve, "resolve", lambda recipe, world_size, resume: seen.append(
        (world_size, recipe_hardware(recipe, world_size))))
    monkeypatch.setattr(launch, "launch", lambda *a: launched.append(a) or 0)
    code = cli.main(["train", "--recipe", "debug", "--hostfile", str(hostfile), "--no-ssh", "--node-rank", "0",
                     "--master-addr", "127.0.0.1", "--master-port", "29513"])
    assert code == 0 and "LOCAL_WORLD_SIZE" not in os.environ
    (world, planned), = seen
    assert world == 4 and (planned.nodes, planned.gpus_per_node) == (2, 2)
    num_procs, port, _, nodes = launched[0]
    assert num_procs is None and port == 29513 and nodes.node_rank == 0 and nodes.no_ssh

    monkeypatch.setenv("LOCAL_SIZE", "2")  # what deepspeed.launcher.launch gives each rank
    assert recipe_hardware(load_recipe("debug"), 4) == planned
    monkeypatch.delenv("LOCAL_SIZE")
    with ranks_per_node(2):
        assert recipe_hardware(load_recipe("debug"), 4) == planned
    assert "LOCAL_WORLD_SIZE" not in os.environ
