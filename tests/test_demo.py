"""The README's main job, as a new user runs it: `imlt demo` end to end on generated glyphs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_learns_unseen_classes_better_than_both_baselines(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "imlt.trainer.cli", "demo", "--output", str(out), "--epochs", "3"],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "160"}, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Model published" in proc.stdout and "raw pixels" in proc.stdout and "bare timm resnet10t loop" in proc.stdout
    results = json.loads((out / "demo_results.json").read_text())
    recall = {name: m["recall_at_1"] for name, m in results["recall"].items()}
    trained = next(v for k, v in recall.items() if k.startswith("trained"))
    # measured (resnet10t, seed 0): val R@1 0.70 after 3 epochs; raw pixels 0.29, untrained ~0.19
    assert trained > recall["raw pixels"] + 0.1 and trained > recall["untrained network"] + 0.1, recall
    # the published model was chosen on these classes; the last epoch's row, chosen on nothing, learnt too
    assert recall["last epoch (no selection)"] > recall["raw pixels"] + 0.1, recall
    published = Path(results["published"]["version_dir"])
    assert (published / "model.onnx").exists() and (published / "model_card.json").exists()
    assert json.loads((out / "published" / "latest").read_text())["version"] == 1
