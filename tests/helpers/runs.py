"""What a training run's directory says, read the way the tests and the helper scripts need it."""

from __future__ import annotations

import json
from pathlib import Path


def registered_epochs(run_dir: Path) -> list[int]:
    """Epochs whose checkpoints Ray Train's controller has registered (what a restart resumes from)."""
    try:
        results = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []
    return [int(r["checkpoint_dir_name"].rsplit("_", 1)[1]) for r in results]
