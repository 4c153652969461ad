"""The launch tests live in folders mirroring launch/ (config/, train/, stages/, export/,
tracking/) and import the helpers kept here (engine_helpers, mlflow_server, stage_hooks,
callback_probe) by basename."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
