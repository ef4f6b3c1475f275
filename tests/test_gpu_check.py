"""benchmarks/gpu_check.py runs every row at a tiny size on CPU: the GPU check is ready when a GPU is at hand."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

pytest.importorskip("torchao")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_prints_its_table_on_cpu(capsys):
    runpy.run_path(str(SCRIPT))["main"](["--device", "cpu", "--tiny", "--batches", "2"])
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("| weights / cache | ms/step @2 | linear weights | KV cache @2 | peak memory |")
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                              for line in lines[start + 2:] if line.startswith("|"))}
    assert len(rows) == 10
    assert rows["int4 weight-only (g128)"][0] == ("skipped: int4-weight-only has no CPU kernel in torchao (it needs a "
                                                  "CUDA GPU); on CPU use int8-weight-only")
    assert rows["float8 (dynamic, per row)"][0].startswith("skipped: float8 needs a CUDA GPU of compute capability 8.9")
    measured = {name: cells for name, cells in rows.items() if not cells[0].startswith("skipped")}
    assert len(measured) == 8 and all(float(cells[0]) > 0 for cells in measured.values())

    def mib(name: str, column: int) -> float:
        return float(rows[name][column].removesuffix(" MiB"))

    assert mib("int8 weight-only", 1) < 0.3 * mib("fp32 captured", 1)  # int8 data and a scale per row
    assert mib("fp32 captured", 1) == pytest.approx(2 * mib("bf16 captured", 1), rel=0.01)
    assert mib("fp32 + bf16 KV cache", 2) == pytest.approx(mib("fp32 captured", 2) / 2, rel=0.01)
    assert mib("bf16 + float8 KV cache", 2) < mib("bf16 captured", 2) / 1.9  # a quarter of fp32, half of bf16
