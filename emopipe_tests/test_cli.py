"""The command line's answers to a mistake: before Dagster or any model library loads."""

import subprocess
import sys


def test_an_unknown_experiment_is_answered_before_dagster_and_torch_load():
    code = ("import sys\nfrom emopipe.cli import main\ncode = main(['run', 'nosuchexperiment'])\n"
            "print(code, ' '.join(m for m in ('torch', 'dagster', 'timm', 'easyocr') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["2"], run.stdout + run.stderr  # exit code 2 and none of the libraries loaded
    [message] = run.stderr.strip().splitlines()  # one line, no traceback
    assert "nosuchexperiment" in message and "experiment" in message
