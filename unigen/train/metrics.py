"""``OUTPUT_DIR/metrics.jsonl`` (one object per optimizer step) and TensorBoard (``OUTPUT_DIR/tensorboard``)."""

from __future__ import annotations

import json
from pathlib import Path

from unigen.tokenizer_training.common import atomic_write


class TrainMetrics:
    def __init__(self, out_dir: Path, stage: int, tensorboard: bool):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.stage = stage
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def rewind(self, step: int) -> None:
        """Before (re)starting this stage at ``step``: drop rows a killed run logged past it, and any later
        stage's, so the log reads as one uninterrupted run."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            row = json.loads(line)
            if row["stage"] < self.stage or (row["stage"] == self.stage and row["step"] <= step):
                keep.append(line + "\n")
        atomic_write(self.path, lambda p: p.write_text("".join(keep)))

    def write(self, step: int, row: dict) -> None:
        row = {"step": step, "stage": self.stage, **row}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("step", "stage") and isinstance(value, int | float):
                    self.tb.add_scalar(f"stage{self.stage}/{key.replace('lr_', 'lr/')}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
