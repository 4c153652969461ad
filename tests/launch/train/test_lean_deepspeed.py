"""lean_deepspeed: stand-ins for DeepSpeed's autotuner and Muon modules and py-cpuinfo asked
once, only on the checked DeepSpeed versions; any other version (or a DeepSpeed already
imported) is left as it is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.launch.train import lean_deepspeed

REPO = Path(__file__).resolve().parents[3]


def _run(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def test_checked_version_imports_deepspeed_without_mlflow_or_muon() -> None:
    _run("import sys\n"
         "from lmforge.launch.train import lean_deepspeed as lean\n"
         "assert lean.install() == [lean.AUTOTUNER, lean.MUON_OPTIMIZER, lean.ORIGINAL_MUON,\n"
         "                          'cpuinfo.get_cpu_info']\n"
         "import deepspeed\n"
         "from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam\n"
         "assert MuonWithAuxAdam is lean.MuonWithAuxAdam\n"
         "assert 'mlflow' not in sys.modules, 'DeepSpeed imported MLflow'\n"
         "import mlflow  # a rank that tracks still imports it\n")


def test_other_versions_and_a_loaded_deepspeed_get_no_stand_ins() -> None:
    _run("import sys\n"
         "from lmforge.launch.train import lean_deepspeed as lean\n"
         "assert lean.install('0.18.0') == []\n"
         "assert not set(lean.stand_ins()) & set(sys.modules)\n"
         "import cpuinfo\n"
         "assert not hasattr(cpuinfo.get_cpu_info, 'lmforge_once')\n"
         "import deepspeed.autotuning.autotuner as tuner\n"
         "assert tuner.Autotuner is not lean.Autotuner and 'mlflow' in sys.modules\n"
         "assert lean.install(lean.CHECKED_DEEPSPEED_VERSIONS[0]) == []  # already loaded\n")


def test_the_pinned_deepspeed_is_a_checked_version() -> None:
    # Bumping DeepSpeed in constraints.txt means re-checking the module paths stood in for.
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().split()
                if "==" in line)
    assert pins["deepspeed"] in lean_deepspeed.CHECKED_DEEPSPEED_VERSIONS


@pytest.mark.parametrize("cls", [lean_deepspeed.MuonWithAuxAdam, lean_deepspeed.Autotuner])
def test_a_stand_in_refuses_to_be_used(cls) -> None:
    with pytest.raises(lean_deepspeed.NotUsedByLmforge, match="not available in lmforge"):
        cls([])


CPU_INFO_ONCE = """
import subprocess, cpuinfo
from lmforge.launch.train import lean_deepspeed as lean
started = []
real_popen = subprocess.Popen
class Counting(real_popen):
    def __init__(self, args, *rest, **kwargs):
        started.append(args)
        super().__init__(args, *rest, **kwargs)
subprocess.Popen = Counting  # py-cpuinfo runs itself in a new process (subprocess.Popen)
truth = cpuinfo.get_cpu_info()
assert len(started) == 1, started
started.clear()
assert lean.keep_cpu_info() and not lean.keep_cpu_info()  # once
first = cpuinfo.get_cpu_info()
first["flags"].append("mutated by a caller")
second = cpuinfo.get_cpu_info()
assert len(started) == 1, started  # asked once, then answered from the first answer
for key in ("arch", "bits", "count", "vendor_id_raw", "brand_raw"):
    assert second.get(key) == truth.get(key), key
assert second["flags"] == truth["flags"]  # each caller gets its own copy
"""


def test_cpu_info_is_asked_once_and_answers_like_py_cpuinfo() -> None:
    """The kept answer equals a direct call of py-cpuinfo's own (in a fresh process)."""
    _run(CPU_INFO_ONCE)
