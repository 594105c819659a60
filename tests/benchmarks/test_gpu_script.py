"""``benchmarks/gpu.sh --cpu-smoke``: the prepared one-GPU benchmark runs end to end on the CPU
(small sizes), so the script cannot rot between GPU sessions. Checks its JSON: the device path
equals the CPU path on every selection and entropy case, sizes are those asked, throughputs
are positive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_script_cpu_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        [str(ROOT / "benchmarks" / "gpu.sh"), "--cpu-smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["mode"] == "cpu-smoke"
    rows = {(r["case"], r["n"], r["d"], r["budget"]) for r in res["rows"]}
    assert rows == {
        ("entropy", 1500, 32, None),
        ("entropy", 3000, 8, None),
        ("greedy", 2000, 16, 200),
        ("threshold", 2000, 16, 200),
    }
    assert all(r["equal"] is True and r["seconds"] > 0 for r in res["rows"])
    gen, train = res["generation"], res["training"]
    assert gen["preset"] == train["preset"] == "unet48" and gen["steps"] == 2
    assert [t["batch"] for t in gen["tried"]] == [1, 2] and gen["largest_batch"] == 2
    assert [t["batch"] for t in train["tried"]] == [1, 2]
    assert gen["best"]["images_per_second"] > 0 and gen["fp32_images_per_second"] > 0
    assert train["best"]["images_per_second"] > 0
    assert "| greedy | 2000 | 16 | 200 |" in proc.stdout  # the table


def test_gpu_script_refuses_without_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run(
        [str(ROOT / "benchmarks" / "gpu.sh"), "--out", str(tmp_path / "g.json")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=300,
    )
    assert proc.returncode == 1 and "CUDA is not available" in proc.stderr
    assert not (tmp_path / "g.json").exists()
