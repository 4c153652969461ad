"""`lmforge submit slurm|ray` of a stage graph, checked without a cluster: the job body is
the graph runner with --resume auto (each stage prepares, trains through srun / Ray Train,
exports), and every value in the script is quoted."""

from __future__ import annotations

import subprocess
from pathlib import Path

from lmforge.launch.config import load_config
from lmforge.launch.submit.ray_jobs import RayJob, job_spec
from lmforge.launch.submit.ray_train import RayTrainJob
from lmforge.launch.submit.slurm import SlurmJob, job_config, render_script, template_name

REPO = Path(__file__).resolve().parents[2]
STAGES = REPO / "configs" / "tiny-stages.yaml"


def test_slurm_script_runs_the_graph(tmp_path):
    run = tmp_path / "run'quote"
    cfg = load_config(STAGES, [f"--run_dir={tmp_path / 'run'}"])
    job = SlurmJob(nodes=1, tasks_per_node=2)
    script = render_script(job_config(cfg, job), job, "train", REPO)
    assert template_name(cfg, "train") == "train.sbatch"  # one template: every run is a graph
    assert ("-m lmforge.launch.submit.job run --config "
            f"{tmp_path / 'run'}/submit/train-config.yaml --launcher slurm --resume auto") in script
    assert "\nsrun " not in script  # each stage's srun step comes from the graph runner
    assert "#SBATCH --requeue" in script and "scontrol requeue" in script
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
    # a path bash would split is quoted where it lands
    cfg = load_config(STAGES, [f"--run_dir={run}"])
    script = render_script(job_config(cfg, job), job, "train", REPO)
    assert "RUN_DIR='" in script and "'\"'\"'quote" in script


def test_ray_job_carries_the_graph(tmp_path):
    cfg = load_config(STAGES, [f"--run_dir={tmp_path}"])
    entrypoint, env = job_spec(cfg, RayJob("http://127.0.0.1:8265", "train", RayTrainJob(2)),
                               REPO)
    assert "-m lmforge.launch.submit.ray_jobs --job train" in entrypoint
    assert load_config(_write(tmp_path, env["env_vars"]["LMFORGE_JOB_CONFIG"])).stages


def _write(tmp: Path, text: str) -> Path:
    path = tmp / "job.yaml"
    path.write_text(text)
    return path
