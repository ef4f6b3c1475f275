"""MoE stages through ``unigen train``: 2-process FSDP (with gradient checkpointing) trains what one process trains,
the MoE columns reach metrics.jsonl, and a dense checkpoint upcycled to MoE starts where the dense model is."""

import pytest
from test_train_resume import GROUPS, TORCHRUN, _same_run
from train_common import cli, losses, metrics, run

from unigen import UniGenModel
from unigen.shapes import write_dataset

# the balance and z losses on: they are taken per sequence, so the split over processes must not change them
MOE = "model.llm.moe={num_experts: 4, top_k: 2, expert_size: 32, num_shared_experts: 1, shared_expert_gate: true, " \
      "aux_loss_weight: 0.05, z_loss_weight: 0.001}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), 24, seed=3)


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    run(cli("--stage", 1, f"data={data}", "stage1.steps=4", GROUPS, MOE, "--output-dir", out, "stage1.batch_size=8"))
    return out


# slow: a `unigen train` subprocess (~25 s); test_moe's in-process moe_metrics test keeps the numbers in the default run
@pytest.mark.slow
def test_the_moe_columns_are_logged(one_process):
    rows = [r for r in metrics(one_process) if r["stage"] == 1]
    assert len(rows) == 4
    for r in rows:
        for layer in ("l0", "l1"):
            shares = [r[f"moe_load_{layer}_e{e}"] for e in range(4)]
            assert sum(shares) == pytest.approx(1.0) and all(0 <= s <= 1 for s in shares)
            assert r[f"moe_aux_{layer}"] >= 2 - 1e-6  # E * sum f_i P_i is at least top_k (perfect balance)
            assert 0 < r[f"moe_entropy_{layer}"] <= 1.3863  # at most log(4)
        assert r["moe_aux"] == pytest.approx((r["moe_aux_l0"] + r["moe_aux_l1"]) / 2)


# slow: two training processes; the dense FSDP test (test_train_resume) keeps the default run's check of the sharding
@pytest.mark.slow
def test_two_process_fsdp_moe_with_gradient_checkpointing_equals_one_process(data, one_process, tmp_path):
    done = run(cli("--stage", 1, f"data={data}", "stage1.steps=4", GROUPS, MOE, "--output-dir", tmp_path,
                   "stage1.batch_size=4", "parallel=fsdp", "grad_checkpointing=true", launcher=TORCHRUN), timeout=600)
    assert "fsdp, 2 process(es)" in done.stderr
    _same_run(one_process, tmp_path)


# slow: trains a dense stage, then the upcycled one; test_moe's upcycling test keeps equal logits in the default run
@pytest.mark.slow
def test_an_upcycled_dense_checkpoint_starts_with_the_dense_loss(data, tmp_path):
    """Step 1's loss (before any update) of the upcycled model is the dense model's; it trains and saves as MoE."""
    common = ["--stage", 1, f"data={data}", "stage1.batch_size=8", GROUPS]
    run(cli(*common, "stage1.steps=2", "--output-dir", tmp_path / "dense"))
    start = ["--init-from", tmp_path / "dense" / "stage1" / "final", "stage1.steps=1"]
    run(cli(*common, *start, "--output-dir", tmp_path / "again"))
    upcycled = "model.llm.moe={num_experts: 4, top_k: 2, upcycle_from_dense: true, aux_loss_weight: 0}"
    run(cli(*common, *start, upcycled, "--output-dir", tmp_path / "moe"))
    (_, dense_loss), = losses(tmp_path / "again")
    (_, moe_loss), = losses(tmp_path / "moe")
    assert abs(dense_loss - moe_loss) < 1e-5
    moe = UniGenModel.from_pretrained(tmp_path / "moe" / "stage1" / "final").config.llm.moe
    assert (moe.num_experts, moe.top_k, moe.upcycle_from_dense) == (4, 2, False)
