"""`lmforge submit slurm --dry-run`: the rendered sbatch script, checked without Slurm."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from lmforge.launch.cli import main
from lmforge.launch.config import load_config
from lmforge.launch.stages.launchers import srun_command
from lmforge.launch.submit.slurm import SlurmJob, job_config, render_script
from lmforge.launch.submit.spec import JobTemplate, render_template

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def dry_run(capsys, tmp_path: Path, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["submit", "slurm", str(TINY), f"--run_dir={tmp_path / 'run'}", "--dry-run", *args])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def directives(script: str) -> list[str]:
    return re.findall(r"^#SBATCH (\S+)$", script, flags=re.M)


def test_gpu_job_flags(capsys, tmp_path):
    script = dry_run(
        capsys, tmp_path, "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
        "--time", "2-00:00:00", "--account", "lm", "--signal-seconds", "600",
        "--sbatch-arg=--qos=high", "--train.global_batch_size=256",
    )
    flags = directives(script)
    for flag in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu",
                 "--time=2-00:00:00", "--account=lm", "--requeue", "--signal=B:USR1@600",
                 "--qos=high", "--open-mode=append"):
        assert flag in flags, flag
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in script
    assert "DS_ACCELERATOR=cpu" not in script
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
    # The job body is the runner; each stage's srun step maps Slurm's task ids to ranks.
    assert "-m lmforge.launch.submit.job run --config" in script
    step = " ".join(srun_command(tmp_path, "auto", None))
    assert "RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID" in step
    assert "--resume auto" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    # A dry run writes nothing and submits nothing.
    assert not (tmp_path / "run").exists()
    assert "# dry run: nothing submitted" in script


def test_cpu_job_uses_gloo_and_config_process_count(capsys, tmp_path):
    script = dry_run(capsys, tmp_path, "--nodes", "2", "--train.global_batch_size=null")
    flags = directives(script)
    assert "--nodes=2" in flags and "--ntasks-per-node=2" in flags  # tiny.yaml: 2 per node
    assert not any(f.startswith(("--gpus", "--partition", "--account", "--time")) for f in flags)
    assert "export DS_ACCELERATOR=cpu" in script
    assert "NCCL" not in script
    assert "export OMP_NUM_THREADS=1" in script


def test_rendered_script_is_valid_bash(capsys, tmp_path):
    script = dry_run(capsys, tmp_path, "--gpus-per-node", "2", "--socket-ifname", "ib0")
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "export NCCL_SOCKET_IFNAME=ib0" in script
    assert "{{" not in script  # every placeholder was filled


def test_batch_size_that_does_not_fit_the_allocation_names_the_key(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["submit", "slurm", str(TINY), "--nodes", "2", "--gpus-per-node", "4", "--dry-run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "tiny.yaml:" in err and "train.global_batch_size" in err and "world size 8" in err


def test_job_config_matches_the_allocation():
    cfg = load_config(TINY, ["--train.global_batch_size=null"])
    cfg = job_config(cfg, SlurmJob(nodes=3, gpus_per_node=4))
    assert (cfg.launch.nnodes, cfg.launch.nproc_per_node, cfg.world_size) == (3, 4, 12)
    script = render_script(cfg, SlurmJob(nodes=3, gpus_per_node=4, master_port=29400))
    assert "MASTER_PORT=29400" in script


@pytest.mark.parametrize("kwargs, field", [
    ({"nodes": 0}, "--nodes"),
    ({"gpus_per_node": 4, "tasks_per_node": 2}, "--tasks-per-node"),
    ({"time": "two hours"}, "--time"),
    ({"sbatch_args": ["qos=high"]}, "--sbatch-arg"),
])
def test_bad_flags_name_the_flag(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SlurmJob(**kwargs)


def test_template_leaves_bash_alone_and_reports_missing_values(tmp_path):
    template = tmp_path / "t.sh"
    template.write_text('echo "$@" ${X:-1} $((1+2)) {{ a }} {{b}}\n')
    assert render_template(template, {"a": 1, "b": "two"}) == 'echo "$@" ${X:-1} $((1+2)) 1 two\n'
    with pytest.raises(KeyError, match="'b'"):
        render_template(template, {"a": 1})
    with pytest.raises(ValueError):
        JobTemplate("{{ 1bad }}").substitute({})
