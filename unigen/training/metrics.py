"""``OUTPUT_DIR/metrics.jsonl`` (one object per optimizer step) and TensorBoard (``OUTPUT_DIR/tensorboard``)."""

from __future__ import annotations

from pathlib import Path

from unigen.runs import MetricsLog


class TrainMetrics:
    def __init__(self, out_dir: Path, stage: int, tensorboard: bool):
        self.log = MetricsLog(Path(out_dir), tensorboard)
        self.path = self.log.path
        self.stage = stage

    def rewind(self, step: int) -> None:
        """Before (re)starting this stage at ``step``: drop rows a killed run logged past it, and any later
        stage's, so the log reads as one uninterrupted run (a torn last line is dropped with a warning)."""
        self.log.keep_only(lambda row: row.get("stage", 0) < self.stage
                           or (row.get("stage") == self.stage and row.get("step", 0) <= step))

    def write(self, step: int, row: dict) -> None:
        row = {"step": step, "stage": self.stage, **row}
        scalars = {f"stage{self.stage}/{_board_name(key)}": value for key, value in row.items()
                   if key not in ("step", "stage") and isinstance(value, int | float)}
        self.log.append(row, scalars, step)

    def close(self) -> None:
        self.log.close()


def preference_row(sums: dict[str, float], pairs: float) -> dict[str, float]:
    """A preference step's logged values from its sums over ``pairs`` pairs (``preference_stage.STATS``): the loss,
    the mean chosen and rejected rewards (``beta * (log pi - log ref)``), their margin, the share of pairs whose
    chosen reward is the larger (accuracy) and the chosen tokens' mean NLL."""
    chosen, rejected = sums["chosen_reward"] / pairs, sums["rejected_reward"] / pairs
    return {"loss": sums["loss"] / pairs, "reward_chosen": chosen, "reward_rejected": rejected,
            "reward_margin": chosen - rejected, "accuracy": sums["correct"] / pairs, "nll_chosen": sums["sft"] / pairs,
            "pairs": int(pairs)}


def _board_name(key: str) -> str:
    """TensorBoard groups ``lr_*`` and the MoE columns (``moe_load_l0_e3`` -> ``moe/load_l0_e3``)."""
    return key.replace("lr_", "lr/").replace("moe_", "moe/", 1)
