"""Commands that do no model work answer without importing torch or Ray (issue 23: under a second)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import SAFETY_S

REPO = Path(__file__).resolve().parents[1]


def test_runs_and_help_import_neither_torch_nor_ray(tmp_path: Path) -> None:
    code = ("import sys\n"
            "from pipeline.cli import main\n"
            f"main(['runs', 'list', '--root', {str(tmp_path)!r}])\n"
            "main(['--help'])\n"
            "import pipeline.analysis.runs_cli, pipeline.analysis.report, pipeline.analysis.runs\n"
            "heavy = sorted(m for m in ('torch', 'ray', 'matplotlib.pyplot') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=SAFETY_S)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout
