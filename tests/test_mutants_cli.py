"""`tests/mutants.py` refuses arguments it does not know (exit 2) instead of starting a full
mutation run (a `--help` once started ~9,300 mutants)."""
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "mutants.py"


@pytest.mark.parametrize("argv,rc", [(["--help"], 0), (["--bogus"], 2), (["report", "extra"], 2)])
def test_mutants_script_arguments(argv, rc, tmp_path):
    p = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == rc, p.stderr
    out = p.stdout + p.stderr
    assert "usage: python tests/mutants.py [report | resume]" in out
    if rc == 2:
        assert repr(" ".join(argv)) in p.stderr
