"""Hostile values in `lmforge submit slurm|ray`: refused by name, or quoted so nothing runs.

A newline in an sbatch flag would end its `#SBATCH` line and make the rest a command (and
sbatch stops reading directives at the first command, dropping `--requeue`/`--signal`).
Printable shell syntax (`$(...)`, backquotes, `;`) must reach bash only quoted: the rendered
script is executed here and must create no file.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from lmforge.launch.cli import main
from lmforge.launch.config import load_config
from lmforge.launch.submit.ray_jobs import RayJob, job_spec
from lmforge.launch.submit.slurm import SlurmJob, job_config, render_script

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
# No whitespace, so they pass the #SBATCH checks and must be defused by quoting.
PAYLOADS = ("$(touch${IFS}PWNED_dollar)", "`touch${IFS}PWNED_tick`", ";touch${IFS}PWNED_semi")


def sbatch_directives(script: str) -> list[str]:
    """The options sbatch reads: #SBATCH lines up to the first command line (as sbatch does)."""
    options = []
    for line in script.splitlines()[1:]:
        text = line.strip()
        if not text:
            continue
        if not text.startswith("#"):
            break
        if text.startswith("#SBATCH"):
            options.append(text.split(None, 1)[1])
    return options


@pytest.mark.parametrize("flag", ["--partition", "--account", "--mem", "--after",
                                  "--sbatch-arg", "--socket-ifname"])
def test_newline_in_a_flag_is_refused_by_name(flag, capsys, tmp_path):
    value = ("--qos=high" if flag == "--sbatch-arg" else "gpu") + "\ntouch PWNED"
    with pytest.raises(SystemExit) as exit_info:
        main(["submit", "slurm", str(TINY), f"--run_dir={tmp_path / 'run'}", "--dry-run",
              f"{flag}={value}"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"lmforge: {flag}: " in err and "control character '\\n'" in err, err
    assert not (tmp_path / "run").exists()


def test_newline_in_the_run_name_is_refused(capsys, tmp_path):
    # On the command line YAML folds a newline into a space; a quoted YAML string keeps it.
    config = tmp_path / "hostile.yaml"
    config.write_text(TINY.read_text() + '\nname: "a\\ntouch PWNED"\n')
    with pytest.raises(SystemExit) as exit_info:
        # tiny.yaml's task files are named from its own folder, which the copy is not in.
        main(["submit", "slurm", str(config), f"--run_dir={tmp_path / 'run'}", "--dry-run",
              "--eval.tasks={}"])
    assert exit_info.value.code == 1
    assert "lmforge: name: 'a\\ntouch PWNED' contains the control character" in \
        capsys.readouterr().err


def test_whitespace_in_a_directive_value_is_refused():
    with pytest.raises(ValueError, match="^--partition: .*whitespace"):
        SlurmJob(partition="gpu --uid=0")


@pytest.mark.parametrize("work", ["train", "prepare"])
def test_hostile_printable_values_run_nothing_and_keep_every_directive(work, tmp_path):
    payload = "".join(PAYLOADS)
    run_dir = tmp_path / f"run{payload}"
    cfg = load_config(TINY, [f"--run_dir={run_dir}", f"--name=n{payload}",
                             "--launch.master_port=29500"])
    job = SlurmJob(nodes=1, partition=f"p{PAYLOADS[0]}", account=f"a{PAYLOADS[2]}",
                   mem="1G", after=f"1{PAYLOADS[1]}", sbatch_args=[f"--comment={PAYLOADS[0]}"],
                   socket_ifname=f"eth0{payload}")
    if work == "train":
        cfg = job_config(cfg, job)
    script = render_script(cfg, job, work, workdir=tmp_path)
    options = sbatch_directives(script)
    expected = [f"--partition=p{PAYLOADS[0]}", f"--account=a{PAYLOADS[2]}", "--mem=1G",
                f"--dependency=afterok:1{PAYLOADS[1]}", f"--comment={PAYLOADS[0]}",
                f"--chdir={tmp_path}"]
    if work == "train":
        expected += ["--requeue", "--signal=B:USR1@300", "--open-mode=append"]
    for option in expected:
        assert option in options, (option, options)
    assert any(o.startswith("--job-name=lmforge-n_") and "$" not in o for o in options)

    if work == "prepare":  # its body starts srun steps: only check that it parses
        path = tmp_path / "job.sbatch"
        path.write_text(script)
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
        return
    # Run the training script for real: its first command that needs Slurm is the setup
    # step, which fails (no job config was written on a dry render) and exits 1. Everything
    # before it, with every hostile value, runs in bash.
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    env = {**os.environ, "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "localhost",
           "SLURM_NTASKS": "2"}
    proc = subprocess.run(["bash", str(path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "lmforge: job 7" in proc.stdout  # the body did run up to the setup step
    assert "train-config.yaml" in proc.stderr  # ...which names the missing job config
    pwned = [p for p in tmp_path.rglob("PWNED*")] + list(REPO.glob("PWNED*"))
    assert not pwned, pwned


def test_ray_job_spec_refuses_control_characters_and_quotes_the_rest(tmp_path):
    with pytest.raises(ValueError, match="^--env HF_HOME: .*control character"):
        RayJob("http://127.0.0.1:8265", "prepare", env={"HF_HOME": "/x\ntouch PWNED"})
    with pytest.raises(ValueError, match="^--env: 'A;B' is not a valid"):
        RayJob("http://127.0.0.1:8265", "prepare", env={"A;B": "1"})
    cfg = load_config(TINY)
    job = RayJob("http://127.0.0.1:8265", "prepare", python=f"python{PAYLOADS[2]}")
    entrypoint, _ = job_spec(cfg, job, tmp_path / f"w{PAYLOADS[0]}")
    (tmp_path / f"w{PAYLOADS[0]}").mkdir()
    # The job server runs the entrypoint with a shell: the odd interpreter name is not found.
    proc = subprocess.run(["bash", "-c", entrypoint], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 127, proc.stderr
    assert not list(tmp_path.rglob("PWNED*")), list(tmp_path.rglob("*"))
    assert shlex.split(entrypoint)[3] == f"python{PAYLOADS[2]}"
