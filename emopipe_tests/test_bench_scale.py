"""`python -m emopipe.bench scale` runs end to end at a small N (its figures are for the README, not asserted
here: timing belongs in benchmarks), and the second run finds the added images and nothing else to do."""

import re
import subprocess
import sys


def test_the_scale_benchmark_runs_both_passes(tmp_path):
    out = subprocess.run([sys.executable, "-m", "emopipe.bench", "scale", "--n", "300", "--keep", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for step in ("raw_images", "images_32", "images_224", "text_scores", "filtered_images", "splits"):
        assert len(re.findall(rf"^  {step} +[\d.]+ CPU-s", out.stdout, re.M)) == 2, out.stdout
    assert re.search(r"incremental / full CPU: [\d.]+%", out.stdout)
    assert (tmp_path / "images").is_dir() and len(list((tmp_path / "images").rglob("*.jpg"))) == 303
