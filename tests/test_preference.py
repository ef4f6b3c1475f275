"""Preference tuning: the losses against hand-written formulas (TRL's DPO variants, the CCA paper's official code),
the pair lines of the manifest, and a tiny dpo / cca stage on the one engine (end to end, resumed bitwise)."""

import copy
import json
import math

import pytest
import torch
from train_common import losses, metrics, recipe, weights

from unigen.data.bad_samples import BadSamples
from unigen.data.checks import check_codes, check_sample_files
from unigen.data.manifest import ManifestError, read_samples
from unigen.errors import ConfigError
from unigen.shapes import write_dataset
from unigen.training import run_stage
from unigen.training.preference import PairScores, PreferenceSettings, cca_losses, dpo_losses
from unigen.training.start import build_fresh

# ---- the losses -------------------------------------------------------------------------------------------

PC, PR, RC, RR = [-10.0, -20.0, -5.0], [-12.0, -15.0, -5.5], [-11.0, -18.0, -6.0], [-11.5, -17.0, -5.0]
TC, TR = [4.0, 8.0, 2.0], [5.0, 8.0, 3.0]  # tokens of each chosen and rejected sequence


def _scores():
    t = lambda x: torch.tensor(x, dtype=torch.float64)
    return PairScores(t(PC), t(PR), t(RC), t(RR), t(TC), t(TR))


def _logsig(x):
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_dpo_sigmoid_loss_and_rewards_are_trls_formula(smoothing):
    beta = 0.3
    out = dpo_losses(_scores(), PreferenceSettings(beta=beta, label_smoothing=smoothing, sft_weight=0.5))
    for i in range(3):
        logits = (PC[i] - PR[i]) - (RC[i] - RR[i])
        want = -_logsig(beta * logits) * (1 - smoothing) - _logsig(-beta * logits) * smoothing
        want += 0.5 * (-PC[i] / TC[i])  # the SFT term: the chosen tokens' mean NLL
        assert out.losses[i].item() == pytest.approx(want, rel=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (PC[i] - RC[i]))
        assert out.rejected_rewards[i].item() == pytest.approx(beta * (PR[i] - RR[i]))
    # pair 0: +0.3 chosen vs -0.15 rejected; pair 1: -0.6 vs +0.6; pair 2: +0.3 vs -0.15
    assert out.correct.tolist() == [1.0, 0.0, 1.0]


def test_ipo_averages_over_tokens_and_hinge_is_a_margin():
    beta = 0.5
    ipo = dpo_losses(_scores(), PreferenceSettings(beta=beta, loss="ipo"))
    hinge = dpo_losses(_scores(), PreferenceSettings(beta=1.0, loss="hinge"))
    for i in range(3):
        mean_logits = (PC[i] / TC[i] - PR[i] / TR[i]) - (RC[i] / TC[i] - RR[i] / TR[i])
        assert ipo.losses[i].item() == pytest.approx((mean_logits - 1 / (2 * beta)) ** 2, rel=1e-12)
    # logits (pc - pr) - (rc - rr): 1.5, -4, 1.5 -> max(0, 1 - logits)
    assert hinge.losses.tolist() == [0.0, 5.0, 0.0]


def test_cca_loss_is_the_official_codes():
    beta, lam = 0.2, 4.0
    positive = torch.tensor([False, True, False])  # row 1: its other prompt is the same text (or unconditional)
    out = cca_losses(_scores(), positive, PreferenceSettings(beta=beta, cca_lambda=lam))
    for i in range(3):
        gap, other = PC[i] - RC[i], PR[i] - RR[i]
        if positive[i]:
            want = -_logsig(beta * gap) - _logsig(beta * other)
        else:
            want = -_logsig(beta * gap) - lam * _logsig(-beta * other)
        assert out.losses[i].item() == pytest.approx(want / lam, rel=1e-12)
    # by hand, row 0: gap 1, other -0.5: (log(1 + e^-0.2) + 4 log(1 + e^-0.1)) / 4
    assert out.losses[0].item() == pytest.approx((math.log1p(math.exp(-0.2)) + 4 * math.log1p(math.exp(-0.1))) / 4)


def test_settings_are_checked_in_one_line():
    with pytest.raises(ConfigError, match=r"stage2.preference.loss must be one of sigmoid, ipo, hinge, got 'kto'"):
        recipe("x", "y", "stage2.objective=dpo", "stage2.preference.loss=kto")
    with pytest.raises(ConfigError, match=r"stage2.objective must be one of sft, dpo, cca, got 'ppo'"):
        recipe("x", "y", "stage2.objective=ppo")
    with pytest.raises(ConfigError, match=r"label_smoothing applies to loss: sigmoid only"):
        recipe("x", "y", "stage2.objective=dpo", "stage2.preference.loss=ipo", "stage2.preference.label_smoothing=0.1")
    with pytest.raises(ConfigError, match=r"stage1.preference is set, but stage1.objective is sft"):
        recipe("x", "y", "stage1.preference.beta=0.5")


# ---- the data ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), 12, seed=5)


def _lines(data):
    return [json.loads(x) for x in data.read_text().splitlines()]


def write_pairs(data, path, n_codes=None, codes_at=()):
    """Image pairs (line i's image chosen over line i+1's for line i's prompt) and answer pairs."""
    rows = _lines(data)
    out = []
    for i, (a, b) in enumerate(zip(rows, rows[1:] + rows[:1], strict=True)):
        image = lambda r: str(data.parent / r["image"])
        pair = {"prompt": a["caption"], "chosen": image(a), "rejected": image(b)}
        if i in codes_at:
            pair["chosen_codes"] = [(i + k) % 64 for k in range(n_codes)]
            pair["rejected_codes"] = [(i * k) % 64 for k in range(n_codes)]
        out.append(pair)
        out.append({"image": image(a), "question": "What is shown?", "chosen": a["caption"], "rejected": b["caption"]})
    path.write_text("".join(json.dumps(x) + "\n" for x in out))
    return path


def test_pair_lines_parse(data, tmp_path):
    samples = read_samples(write_pairs(data, tmp_path / "pairs.jsonl", 16, codes_at=(0,)))
    image, answer = samples[0], samples[1]
    assert image.tasks == ["image_pair"] and image.caption == _lines(data)[0]["caption"]
    assert image.chosen_codes == [k % 64 for k in range(16)] and image.chosen.is_file()
    assert answer.tasks == ["answer_pair"] and answer.question == "What is shown?" and answer.image.is_file()
    good, bad = check_sample_files(samples)
    assert len(good) == len(samples) and not bad
    assert good[0].chosen_codes.dtype == torch.int32


@pytest.mark.parametrize(("line", "message"), [
    ({"prompt": "a red circle", "chosen": "a.png"},
     "a preference line needs 'chosen' and 'rejected'; 'rejected' is missing"),
    ({"prompt": "a red circle", "chosen": "a.png", "rejected": "./a.png"},
     "'chosen' and 'rejected' name the same image a.png; a pair compares two different images"),
    ({"image": "a.png", "question": "what?", "chosen": "red", "rejected": "red"},
     "'chosen' and 'rejected' are the same answer 'red'; a pair compares two different answers"),
    ({"chosen": "a.png", "rejected": "b.png"}, "a preference line needs 'prompt' (an image pair) or 'image' and "
     "'question' (an answer pair)"),
    ({"prompt": "a red circle", "chosen": "a.png", "rejected": "b.png", "chosen_codes": [1.5]},
     "'chosen_codes' must be a list of ints or a .npy/.pt file name"),
])
def test_bad_pair_lines_are_named_with_their_line(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"image": "x.png", "caption": "ok"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ManifestError) as err:
        read_samples(path)
    assert str(err.value).startswith(f"{path}:2: {message}")


def test_codes_of_the_wrong_length_are_a_bad_sample_with_its_line(data, tmp_path):
    samples, _ = check_sample_files(read_samples(write_pairs(data, tmp_path / "p.jsonl", 15, codes_at=(2,))))
    bad = BadSamples(max_fraction=1.0)
    kept = check_codes(samples, 16, 64, bad)
    assert len(kept) == len(samples) - 1
    [row] = bad.rows
    assert row["line"] == 5 and row["reason"] == f"{tmp_path / 'p.jsonl'}:5 chosen_codes: 15 pre-extracted codes; " \
                                                "the VQ makes 16"


# ---- the stage --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def start(data, tmp_path_factory):
    """A tiny untrained checkpoint: the preference stage's start and reference."""
    out = tmp_path_factory.mktemp("start")
    model, processor = build_fresh(recipe(data, out), read_samples(data))
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    return out / "model"


def _dpo(data, start, out, *extra):
    pairs = write_pairs(data, out.parent / f"{out.name}-pairs.jsonl", 64, codes_at=(0, 3))
    return recipe(pairs, out, f"init_from={start}", "stage2.objective=dpo", "stage2.steps=4", "stage2.batch_size=4",
                  "stage2.warmup_steps=1", "stage2.lr=1e-3", "save_every=2", "stage2.preference.sft_weight=0.1",
                  *extra)


def test_a_dpo_stage_runs_logs_and_resumes_bitwise(data, start, tmp_path):
    final = run_stage(_dpo(data, start, tmp_path / "a"), 2, progress=False)
    rows = [r for r in metrics(tmp_path / "a") if r["stage"] == 2]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    first = rows[0]
    # the policy starts as the reference: every reward 0, so the sigmoid loss is log 2 plus the SFT term
    assert first["reward_chosen"] == first["reward_rejected"] == first["reward_margin"] == 0.0
    assert first["accuracy"] == 0.0 and first["pairs"] == 4
    assert first["loss"] == pytest.approx(math.log(2) + 0.1 * first["nll_chosen"], rel=1e-6)
    assert rows[-1]["reward_margin"] != 0.0
    run_stage(_dpo(data, start, tmp_path / "b"), 2, max_steps=2, progress=False)
    run_stage(_dpo(data, start, tmp_path / "b"), 2, resume="latest", progress=False)
    assert losses(tmp_path / "a", 2) == losses(tmp_path / "b", 2)
    wa, wb = weights(final), weights(tmp_path / "b" / "stage2" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_cca_stage_contrasts_prompts(data, start, tmp_path):
    r = recipe(data, tmp_path, f"init_from={start}", "stage2.objective=cca", "stage2.steps=2", "stage2.batch_size=4",
               "stage2.preference.cca_lambda=2", "stage2.preference.unconditional=true", "caption_dropout=0.25")
    run_stage(r, 2, progress=False)
    rows = [r for r in metrics(tmp_path) if r["stage"] == 2]
    # at the start both gaps are 0: each row's loss is (log 2 + w log 2) / max(lambda, 1), w = 2 or 1 (positive)
    assert math.log(2) * 2 / 2 <= rows[0]["loss"] <= math.log(2) * 3 / 2 + 1e-6
    assert rows[0]["pairs"] == 4 and len(rows) == 2


def test_the_reference_gets_no_gradient_and_stays_unchanged(data, start, tmp_path):
    from unigen.training.batches import BatchBuilder
    from unigen.training.mixture import Pick
    from unigen.training.preference_stage import PairBatches, PreferenceStep, Row
    from unigen.training.start import load_pretrained

    model, processor = load_pretrained(start)
    reference, _ = load_pretrained(start)
    reference.requires_grad_(False)
    before = copy.deepcopy(reference.state_dict())
    samples, _ = check_sample_files(read_samples(write_pairs(data, tmp_path / "p.jsonl")))
    rows = [Row(Pick("generation", s)) for s in samples if s.question is None][:3]
    rows += [Row(Pick("understanding", s)) for s in samples if s.question is not None][:2]
    batch = PairBatches(BatchBuilder(model, processor, "Describe the image.")).build(rows, "dpo")
    step = PreferenceStep(model, "dpo", PreferenceSettings(), reference=reference)
    assert list(step.children()) == [model]  # the reference is no submodule: no wrapper syncs or trains it
    out = step(batch)
    out[0].backward()
    assert out[1:3].abs().sum().item() == 0.0  # policy == reference: every reward 0
    assert all(p.grad is None for p in reference.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())


def test_with_lora_the_reference_is_the_base_with_adapters_off(data, start, tmp_path):
    from unigen.training import lora as lora_
    from unigen.training.batches import BatchBuilder
    from unigen.training.mixture import Pick
    from unigen.training.preference_stage import PairBatches, PreferenceStep, Row, scores
    from unigen.training.start import load_pretrained

    model, processor = load_pretrained(start)
    base, _ = load_pretrained(start)
    samples, _ = check_sample_files(read_samples(write_pairs(data, tmp_path / "p.jsonl")))
    rows = [Row(Pick("generation", s)) for s in samples if s.question is None][:2]
    batch = PairBatches(BatchBuilder(model, processor, "Describe the image.")).build(rows, "dpo")["generation"]
    peft_model = lora_.attach(model, lora_.LoraSettings(r=4), "stage2.lora")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # trained adapters: the policy now differs from its base
    step = PreferenceStep(model, "dpo", PreferenceSettings(), peft_model=peft_model)
    with torch.no_grad():
        want, _ = scores(base, "generation", batch)
        policy, _ = scores(model, "generation", batch)
        with step.reference() as reference:
            got, _ = scores(reference, "generation", batch)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(policy, want, atol=1e-3)


# ---- unigen pairs -----------------------------------------------------------------------------------------

JUDGE = '''
import numpy as np

def brightness(prompt, image):
    return float(np.asarray(image.convert("L"), dtype=np.float64).mean())
'''


def test_pairs_are_ordered_by_the_judge_and_hold_the_sampled_codes(start, tmp_path, monkeypatch, capsys):
    import numpy as np
    from PIL import Image

    from unigen.cli import main
    from unigen.models.model import UniGenModel
    from unigen.processor import pixels_to_pil

    (tmp_path / "my_judge.py").write_text(JUDGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "pairs"
    common = ["pairs", "--model", str(start), "--shapes", "3", "--k", "3", "--temperature", "1", "--output-dir"]
    assert main([*common, str(out), "--judge", "my_judge:brightness"]) == 0
    assert "3 pairs from 3 prompts x 3 images" in capsys.readouterr().out
    lines = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    model = UniGenModel.from_pretrained(start)
    for line in lines:
        assert line["chosen_score"] > line["rejected_score"]
        for side in ("chosen", "rejected"):
            saved = Image.open(out / line[side])
            assert line[f"{side}_score"] == pytest.approx(np.asarray(saved.convert("L"), dtype=np.float64).mean())
            # the codes are the sampler's: decoding them gives the saved image (to a unit of rounding: the
            # sampler decoded a batch of three)
            decoded = pixels_to_pil(model.decode_image_tokens(torch.tensor([line[f"{side}_codes"]])))[0]
            assert np.abs(np.asarray(decoded, dtype=int) - np.asarray(saved.convert("RGB"), dtype=int)).max() <= 1
    samples, _ = check_sample_files(read_samples(out / "pairs.jsonl"))
    assert len(check_codes(samples, 64, 64, BadSamples())) == 3
    # the Shapes checker as the judge: an untrained model's images may all read alike, which gives no pair
    assert main([*common, str(tmp_path / "shapes"), "--judge", "shapes"]) == 0
    said = capsys.readouterr().out
    n = len((tmp_path / "shapes" / "pairs.jsonl").read_text().splitlines())
    assert f"{n} pairs from 3 prompts x 3 images" in said and f"{3 - n} prompt(s) gave no pair" in said
    assert main([*common, str(out)]) == 1  # pairs.jsonl exists: refused without --overwrite
    assert "pass --overwrite to replace it" in capsys.readouterr().err


def test_cca_takes_the_next_differing_prompt_of_the_micro_batch():
    from unigen.data.manifest import Sample
    from unigen.training.mixture import Pick
    from unigen.training.preference_stage import mismatches

    a, a2, b = Sample(1, caption="a"), Sample(2, caption="a"), Sample(3, caption="b")
    rows = mismatches([Pick("generation", s) for s in (a, a2, b)])
    assert [r.other for r in rows] == [b, b, a]
    assert [r.other for r in mismatches([Pick("generation", a), Pick("generation", a2)])] == [None, None]


@pytest.mark.slow  # three training subprocesses, two of them 2-process launches (~2 min)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_dpo_stage_on_two_processes_equals_one(data, start, tmp_path, parallel):
    from test_train_resume import TORCHRUN
    from train_common import cli, run

    pairs = write_pairs(data, tmp_path / "pairs.jsonl", 64, codes_at=(1,))
    common = ["--stage", 2, "--init-from", start, f"data={pairs}", "stage2.objective=dpo", "stage2.steps=4",
              "stage2.preference.sft_weight=0.1", "stage2.groups=[aligner,gen_aligner,gen_embed,gen_head,llm]"]
    run(cli(*common, "--output-dir", tmp_path / "one", "stage2.batch_size=4"), timeout=900)
    run(cli(*common, "--output-dir", tmp_path / "two", "stage2.batch_size=2", f"parallel={parallel}",
            launcher=TORCHRUN), timeout=900)
    one, two = ([r for r in metrics(tmp_path / x) if r["stage"] == 2] for x in ("one", "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for key in ("loss", "reward_chosen", "reward_rejected", "accuracy", "nll_chosen"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], abs=1e-5), key
    wa, wb = (weights(tmp_path / x / "stage2" / "final") for x in ("one", "two"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
