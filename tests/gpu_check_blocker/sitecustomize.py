"""Makes the packages a bare GPU machine lacks unimportable (tests/test_gpu_check.py):
set LMFORGE_BLOCK_IMPORTS=a,b and put this folder on PYTHONPATH."""
import importlib.abc
import os
import sys

BLOCKED = set(filter(None, os.environ.get("LMFORGE_BLOCK_IMPORTS", "").split(",")))


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None


sys.meta_path.insert(0, _Block())
