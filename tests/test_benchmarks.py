"""The benchmark scripts that docs quote run at CI size, so that they cannot rot between measurements."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_throughput_runs_every_path_in_both_precisions_at_ci_size(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--tiny", "--device",
                             "cpu", "--workdir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if re.match(r"\| \([abcd]\) ", line)]
    assert [row[3] for row in rows] == ["a", "b", "c", "d"]
    assert "| path | fp32 | bf16 | fp32 / (a) | bf16 / (a) | bf16 / fp32 |" in result.stdout
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[1]) > 0 and float(cells[2]) > 0
    assert max(len(line) for line in result.stdout.splitlines()) <= 100
    assert list(tmp_path.iterdir()) == []  # the twin and the runs were temporary
