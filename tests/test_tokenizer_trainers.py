"""Smoke and behaviour tests of the two visual tokenizer trainers (tiny images, tiny models, CPU)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unigen.config import LLMConfig, VQConfig
from unigen.config_io import load_config
from unigen.data.image_dataset import to_pixels
from unigen.errors import CheckpointError, DataError
from unigen.training.tokenizer import losses
from unigen.training.tokenizer.siglip_trainer import SigLIPTrainConfig, SigLIPTrainer, load_siglip, load_siglip_into
from unigen.training.tokenizer.vq_trainer import VQTrainConfig, VQTrainer, load_vq, load_vq_into

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "white": (235, 235, 235)}
SPOTS = {"left": (1, 4), "right": (9, 4), "top": (5, 0), "bottom": (5, 9)}


def write_images(root: Path, n: int, size: int = 16) -> Path:
    """``n`` squares of distinct colour/position on black + a JSONL manifest with captions."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    combos = [(c, s) for c in COLORS for s in SPOTS]
    for i in range(n):
        color, spot = combos[i % len(combos)]
        img = Image.new("RGB", (size, size))
        x, y = SPOTS[spot]
        img.paste(COLORS[color], (x, y, x + 6, y + 6))
        img.save(root / "img" / f"{i:03d}.png")
        rows.append({"image": f"img/{i:03d}.png", "caption": f"a {color} square at the {spot}"})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "data.jsonl"


def vq_config(tmp_path: Path, data: Path, **kw) -> VQTrainConfig:
    values = dict(data=str(data), out_dir=str(tmp_path / "vq"), steps=30, batch_size=4, lr=3e-3, warmup_steps=0,
                  lr_schedule="constant", val_size=0, log_every=1000, eval_every=1000, save_every=1000,
                  sample_images=0, device="cpu", usage_window=1000,
                  vq=dict(image_size=16, base_channels=32, channel_mult=[1, 2], num_res_blocks=1, z_channels=32,
                          embed_dim=4, codebook_size=32))
    values.update(kw)
    return load_config(VQTrainConfig, **values)


def test_vq_overfits_a_fixed_batch(tmp_path):
    cfg = vq_config(tmp_path, write_images(tmp_path, 4), steps=40)
    trainer = VQTrainer(cfg)
    before = trainer.evaluate()["psnr"]
    losses_ = [h["loss"] for h in trainer.train()]
    assert sum(losses_[-5:]) / 5 < 0.5 * sum(losses_[:5]) / 5, losses_
    assert trainer.evaluate()["psnr"] > before + 3
    # the saved tokenizer loads and reproduces the trained model's codes
    vq = load_vq(cfg.out_dir)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(vq.encode(x), trainer.model.eval().encode(x))
    rows = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "eval"} <= {r["kind"] for r in rows} and "psnr" in rows[-1] and "usage" in rows[-1]


def test_pre_extracted_codes_match_what_the_trainer_would_encode(tmp_path):
    from unigen.data.manifest import read_samples
    from unigen.processor import generation_pixels
    from unigen.training.tokenizer.vq_codes import add_vq_codes

    data = write_images(tmp_path, 6)
    cfg = vq_config(tmp_path, data, steps=2)
    VQTrainer(cfg).train()
    with data.open("a") as f:  # a text-only line is copied as it is
        f.write(json.dumps({"text": "text only"}) + "\n")
    coded = add_vq_codes(data, cfg.out_dir, tmp_path / "coded.jsonl", batch_size=4, progress=False)
    samples = read_samples(coded)
    vq = load_vq(cfg.out_dir)
    want = vq.encode(generation_pixels([s.image for s in samples[:6]], 16))
    assert [s.codes for s in samples[:6]] == want.tolist() and samples[6].text == "text only"
    with pytest.raises(ValueError, match="next to"):
        add_vq_codes(data, cfg.out_dir, tmp_path / "sub" / "coded.jsonl")


def test_dead_codes_are_reseeded_from_encoder_outputs(tmp_path):
    cfg = vq_config(tmp_path, write_images(tmp_path, 4), vq=dict(
        image_size=16, base_channels=32, channel_mult=[1, 2], num_res_blocks=1, z_channels=32, embed_dim=4,
        codebook_size=256))
    trainer = VQTrainer(cfg)
    trainer.train(2)
    weight = trainer.model.quantize.embedding.weight
    dead = trainer.usage.counts == 0
    assert dead.sum() > 100  # 4 images x 64 positions cannot use all 256 codes
    before = weight.detach().clone()
    assert trainer.reinit_dead_codes() == int(dead.sum())
    after = weight.detach()
    assert torch.equal(after[~dead], before[~dead])
    assert (after[dead] != before[dead]).any(1).all()
    # each re-seeded code points (almost) exactly where some recent encoder output points
    cos = F.normalize(after[dead], dim=-1) @ trainer.z_buffer.t()
    assert cos.max(1).values.min() > 0.99
    assert trainer.optimizer.state[weight]["exp_avg"][dead].abs().sum() == 0


def test_autoencoder_warmup_then_kmeans_codebook(tmp_path):
    cfg = vq_config(tmp_path, write_images(tmp_path, 8), steps=6, ae_warmup_steps=3, kmeans_batches=2,
                    vq=dict(image_size=16, base_channels=32, channel_mult=[1, 2], num_res_blocks=1, z_channels=32,
                            embed_dim=4, codebook_size=64))
    trainer = VQTrainer(cfg)
    weight = trainer.model.quantize.embedding.weight
    start = weight.detach().clone()
    warm = trainer.train(3)
    # no quantizer in the warm-up: the codebook neither learns nor counts usage
    assert all("codebook" not in h for h in warm) and torch.equal(weight.detach(), start)
    assert trainer.usage.counts.sum() == 0

    def mean_cos_to_nearest(codebook):
        x = to_pixels(torch.stack([trainer.train_set[i][0] for i in range(8)]))
        with torch.no_grad():
            h = trainer.model.quant_conv(trainer.model.encoder(x))
        z = F.normalize(h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]), dim=-1)
        return float((z @ F.normalize(codebook, dim=-1).t()).max(1).values.mean())

    random_fit = mean_cos_to_nearest(start)
    info = trainer.kmeans_init_codebook()
    assert info["points"] == 8 * 64 and 1 <= info["codes_with_points"] <= 64
    # k-means centres sit on the data: the distance (1 - cos) to the nearest code drops several-fold
    assert 1 - mean_cos_to_nearest(weight.detach()) < 0.3 * (1 - random_fit), random_fit
    # the codes keep the initial mean norm: the lookup normalises, but their gradient scale goes with 1/|e|
    assert torch.allclose(weight.detach().norm(dim=1), start.norm(dim=1).mean().expand(64), rtol=1e-4)

    # the training loop runs it once, at the end of the warm-up, then quantizes
    again = VQTrainer(dataclasses.replace(cfg, out_dir=str(tmp_path / "again")))
    assert "codebook" in again.train()[-1]
    kmeans = [json.loads(line) for line in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()
              if '"kmeans_init"' in line]
    assert [r["step"] for r in kmeans] == [3]


def test_resume_across_the_warmup_matches_uninterrupted(tmp_path):
    data = write_images(tmp_path, 12)
    kw = dict(steps=6, save_every=2, keep_last=5, ae_warmup_steps=2, kmeans_batches=2, weight_decay=0.1)
    full = [h["loss"] for h in VQTrainer(vq_config(tmp_path, data, out_dir=str(tmp_path / "a"), **kw)).train()]
    ckpt = tmp_path / "a" / "checkpoints" / "step_0000002"  # saved before the k-means init ran
    resumed = VQTrainer(vq_config(tmp_path, data, out_dir=str(tmp_path / "b"), resume=str(ckpt), **kw))
    assert [h["loss"] for h in resumed.train()] == full[2:]


def test_checkpoints_are_in_the_stages_layout_and_the_earlier_one_is_refused_in_one_line(tmp_path):
    data = write_images(tmp_path, 12)  # 3 batches of 4 per epoch
    VQTrainer(vq_config(tmp_path, data, steps=2, save_every=2)).train()
    ckpt = tmp_path / "vq" / "checkpoints" / "step_0000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors", "optimizer.pt",
                                                      "progress.json", "rng_0.pt", "task.pt", "train_config.json"]
    progress = json.loads((ckpt / "progress.json").read_text())
    assert progress == {"step": 2, "data": {"epoch": 0, "batch": 2, "train_size": 12, "global_batch": 4}}
    old = tmp_path / "old" / "checkpoints" / "step_0000002"  # what the tokenizers wrote before the one layout
    old.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "train_config.json"):
        (old / name).write_bytes((ckpt / name).read_bytes())
    torch.save({"step": 2, "optimizer": torch.load(ckpt / "optimizer.pt", weights_only=True)},
               old / "training_state.pt")
    message = r"step_0000002 is a tokenizer checkpoint in unigen's earlier layout \(training_state\.pt\)"
    for resume, out in ((str(old), "fresh"), ("latest", "old")):
        with pytest.raises(CheckpointError, match=message):
            VQTrainer(vq_config(tmp_path, data, steps=4, out_dir=str(tmp_path / out), resume=resume))


def test_weight_decay_applies(tmp_path):
    trainer = VQTrainer(vq_config(tmp_path, write_images(tmp_path, 4), weight_decay=0.5, lr=0.1))
    model = trainer.model
    conv = model.encoder.conv_in.weight
    codebook = model.quantize.embedding.weight
    bias = model.encoder.conv_in.bias
    before = {name: p.detach().clone() for name, p in [("conv", conv), ("codebook", codebook), ("bias", bias)]}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    # zero gradient: AdamW's update is 0, only the decoupled decay moves the weight: w *= 1 - lr * wd
    assert torch.allclose(conv.detach(), before["conv"] * (1 - 0.1 * 0.5))
    assert torch.equal(codebook.detach(), before["codebook"]) and torch.equal(bias.detach(), before["bias"])


def test_discriminator_not_run_while_off(tmp_path, monkeypatch):
    calls = []
    original = losses.PatchDiscriminator.forward
    monkeypatch.setattr(losses.PatchDiscriminator, "forward", lambda self, x: calls.append(1) or original(self, x))
    data = write_images(tmp_path, 4)
    off = VQTrainer(vq_config(tmp_path, data, disc_weight=0.0))
    off.train(3)
    assert off.disc is None and not calls
    late = VQTrainer(vq_config(tmp_path, data, out_dir=str(tmp_path / "gan"), disc_weight=0.1, disc_start=2,
                               disc_layers=2, disc_channels=8))
    per_step = []
    for _ in range(4):
        n = len(calls)
        late.train(late.step + 1)
        per_step.append(len(calls) - n)
    assert per_step == [0, 0, 3, 3]  # from disc_start: once for the generator, twice (real, fake) for D
    assert "g_adv" in late.train(5)[-1]


def test_resume_mid_epoch_matches_uninterrupted(tmp_path):
    data = write_images(tmp_path, 12)  # 3 batches per epoch: step 4 is mid-epoch
    vq = dict(image_size=16, base_channels=32, channel_mult=[1, 2], num_res_blocks=1, z_channels=32, embed_dim=4,
              codebook_size=256)
    kw = dict(steps=7, save_every=4, random_flip=True, usage_window=3, disc_weight=0.1, disc_start=1,
              disc_layers=2, disc_channels=8, weight_decay=0.1, reinit_stop_fraction=1.0, vq=vq)
    full = [h["loss"] for h in VQTrainer(vq_config(tmp_path, data, out_dir=str(tmp_path / "a"), **kw)).train()]
    log = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "reinit"] == [3, 6]  # dead-code re-seeding is exercised
    ckpt = tmp_path / "a" / "checkpoints" / "step_0000004"
    resumed = VQTrainer(vq_config(tmp_path, data, out_dir=str(tmp_path / "b"), resume=str(ckpt), **kw))
    assert resumed.step == 4 and resumed.batches_position() == (1, 1)
    rest = [h["loss"] for h in resumed.train()]
    assert rest == full[4:]
    fresh = [h["loss"] for h in VQTrainer(vq_config(tmp_path, data, out_dir=str(tmp_path / "c"), **kw)).train(7)]
    assert fresh == full  # the run itself is deterministic, so equality above means something
    assert VQTrainer(vq_config(tmp_path, data, out_dir=str(tmp_path / "a"), resume="auto", **kw)).step == 7
    with pytest.raises(FileExistsError, match="--resume latest"):  # a fresh run must not mix with old checkpoints
        VQTrainer(vq_config(tmp_path, data, out_dir=str(tmp_path / "a"), **kw))


def test_bad_images_are_skipped_and_listed(tmp_path, caplog):
    write_images(tmp_path, 4)
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png at all")
    manifest = tmp_path / "data.jsonl"
    manifest.write_text(manifest.read_text() + json.dumps({"image": "img/broken.png"}) + "\n"
                        + json.dumps({"image": "img/missing.png"}) + "\n")
    trainer = VQTrainer(vq_config(tmp_path, manifest, max_bad_fraction=0.5))
    assert len(trainer.train_set) == 4
    listed = [json.loads(x) for x in (Path(trainer.cfg.out_dir) / "bad_samples.jsonl").read_text().splitlines()]
    assert [(Path(r["file"]).name, r["reason"].split(":")[0]) for r in listed] == [("broken.png", "unreadable"),
                                                                                 ("missing.png", "missing")]
    assert "skipped 2 of 6" in caplog.text
    # a folder works too (the broken file is skipped there as well)
    assert len(VQTrainer(vq_config(tmp_path, tmp_path / "img", max_bad_fraction=0.5)).train_set) == 4
    # above the limit the run stops before it writes anything, in one line naming the first bad files
    with pytest.raises(DataError, match=r"2 of 6 training images \(33\.3%\) are bad, more than "
                                        r"max_bad_fraction=0\.3; first: .*broken\.png: unreadable"):
        VQTrainer(vq_config(tmp_path, manifest, out_dir=str(tmp_path / "limit"), max_bad_fraction=0.3))
    assert not (tmp_path / "limit").exists()


def test_manifest_caption_keys(tmp_path):
    from unigen.data.manifest import read_records

    rows = [{"image": "a.png", "caption": "one"}, {"image": "/abs/b.png", "text": "two"},
            {"image": "c.png", "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                 {"from": "gpt", "value": "three"}]}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_records(tmp_path / "m.jsonl", need_text=True)
    assert [r.text for r in records] == ["one", "two", "three"]
    assert records[0].image == tmp_path / "a.png" and records[1].image == Path("/abs/b.png")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "a.png"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: needs the image's text in one of \['caption', 'text', "
                                         r"'prompt', 'conversations'\]"):
        read_records(tmp_path / "bad.jsonl", need_text=True)


def test_config_errors_are_clear(tmp_path):
    data = write_images(tmp_path, 4)
    with pytest.raises(ValueError, match=r"unknown key\(s\) in config.vq: \['codebok_size'\]"):
        load_config(VQTrainConfig, None, ["vq.codebok_size=10"])
    with pytest.raises(ValueError, match="perceptual_net_path"):
        VQTrainer(vq_config(tmp_path, data, perceptual_weight=1.0))
    with pytest.raises(ValueError, match=r"ae_warmup_steps must be in \[0, steps\) = \[0, 3\), got 3"):
        load_config(VQTrainConfig, None, ["steps=3", "ae_warmup_steps=3"])
    for recipe, cls in (("vq-shapes.yaml", VQTrainConfig), ("siglip-shapes.yaml", SigLIPTrainConfig)):
        steps = ["steps=3", "ae_warmup_steps=1"] if cls is VQTrainConfig else ["steps=3"]
        cfg = load_config(cls, ROOT / "tokenizers" / recipe, steps)
        assert cfg.steps == 3 and cfg.data


def test_perceptual_loss_on_a_small_feature_net():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, 2, 1))
    loss = losses.PerceptualLoss(net, taps=(1, 2))
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert loss(x, x).item() == 0.0 and loss(x, -x).item() > 0
    assert not any(p.requires_grad for p in loss.parameters())


def siglip_config(tmp_path: Path, data: Path, **kw) -> SigLIPTrainConfig:
    values = dict(data=str(data), out_dir=str(tmp_path / "siglip"), steps=200, batch_size=8, lr=3e-3,
                  warmup_steps=0, lr_schedule="constant", val_size=0, log_every=1000, eval_every=1000,
                  save_every=1000, device="cpu", embed_dim=32,
                  vision=dict(image_size=16, patch_size=8, width=32, depth=1, num_heads=2),
                  text=dict(width=32, depth=1, num_heads=2, max_len=8))
    values.update(kw)
    return load_config(SigLIPTrainConfig, **values)


def test_siglip_overfits_and_drops_into_unigen_model(tmp_path):
    cfg = siglip_config(tmp_path, write_images(tmp_path, 8))
    trainer = SigLIPTrainer(cfg)
    assert trainer.model.logit_scale.exp().item() == pytest.approx(10.0)
    assert trainer.model.logit_bias.item() == pytest.approx(-10.0)
    hist = [h["loss"] for h in trainer.train()]
    # the bias alone takes the loss from ~10 to a ~3 plateau; below it only by telling pairs apart
    assert sum(hist[-5:]) / 5 < 0.5 * sum(hist[10:30]) / 20, hist
    scores = trainer.evaluate()
    assert scores["n_classes"] == 8 and scores["i2t_acc"] >= 0.5  # chance is 1/8

    from unigen import UniGenConfig, UniGenModel

    llm = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=2,
                    max_position_embeddings=64)
    vq = dict(image_size=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, z_channels=32, embed_dim=4)
    config = UniGenConfig(vision=cfg.vision, vq=VQConfig(codebook_size=32, **vq), llm=llm, gen_head_dim=32)
    model = UniGenModel(config)
    load_siglip_into(model, cfg.out_dir)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(model.vision_model(x), trainer.model.vision_model.eval()(x), atol=1e-6)
        assert torch.allclose(load_siglip(cfg.out_dir)(x), model.vision_model(x), atol=1e-6)
    vq_cfg = vq_config(tmp_path, tmp_path / "data.jsonl", steps=2)
    VQTrainer(vq_cfg).train()
    load_vq_into(model, vq_cfg.out_dir)
    codebook = load_vq(vq_cfg.out_dir).quantize.embedding.weight
    assert torch.equal(model.gen_vision_model.quantize.embedding.weight, codebook)
    with pytest.raises(ValueError, match="does not fit the model"):
        other = UniGenConfig(vision=cfg.vision, vq=VQConfig(codebook_size=64, **vq), llm=llm, gen_head_dim=32)
        load_vq_into(UniGenModel(other), vq_cfg.out_dir)


def test_cli_train_vq_runs_a_recipe(tmp_path):
    from unigen.cli import main

    data = write_images(tmp_path, 4)
    rc = main(["train-vq", "--config", str(ROOT / "tokenizers" / "vq-shapes.yaml"), f"data={data}",
               f"out_dir={tmp_path / 'cli'}", "steps=2", "batch_size=2", "val_size=0", "vq.image_size=16",
               "vq.channel_mult=[1,2]", "vq.codebook_size=16", "vq.base_channels=32", "sample_images=2",
               "ae_warmup_steps=1", "kmeans_batches=1"])  # the recipe's 100 warm-up steps need steps > 100
    assert rc == 0 and load_vq(tmp_path / "cli").config.codebook_size == 16
    assert (tmp_path / "cli" / "samples" / "step_0000002.png").is_file()


def test_tokenizers_folder_does_not_shadow_hf_tokenizers():
    assert (ROOT / "tokenizers").is_dir()
    assert not list((ROOT / "tokenizers").rglob("__init__.py"))
    # run from the repo root, where a package named tokenizers/ would win over site-packages
    code = "import tokenizers, sys; print(tokenizers.__file__); tokenizers.Tokenizer; tokenizers.models.WordLevel"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "site-packages" in out.stdout, out.stdout


def test_local_encoder_has_no_attention_and_normalises_each_pixel_alone(tmp_path):
    from unigen.models.vq import ChannelNorm, VQModel

    cfg = dict(image_size=16, base_channels=8, channel_mult=[1, 2], num_res_blocks=1, z_channels=8, embed_dim=4,
               codebook_size=16, norm_groups=4)
    llamagen, local = VQModel(VQConfig(**cfg)), VQModel(VQConfig(**cfg, local_encoder=True))
    attn = {k for k in llamagen.state_dict() if k.startswith("encoder.") and ".q." in k}
    assert attn and not any(k.startswith("encoder.") and ".q." in k for k in local.state_dict())
    assert any(".q." in k for k in local.state_dict() if k.startswith("decoder."))  # the decoder is LlamaGen's
    norm = ChannelNorm(6)
    x = torch.randn(2, 6, 5, 5)
    want = F.layer_norm(x.permute(0, 2, 3, 1), (6,), eps=1e-6).permute(0, 3, 1, 2)
    assert torch.allclose(norm(x), want, atol=1e-6)
    x2 = x.clone()
    x2[:, :, 0, 0] += 100  # one pixel changes: every other pixel's output stays the same
    assert torch.equal(norm(x2)[:, :, 1:], norm(x)[:, :, 1:])
    # the flag is part of the tokenizer's architecture: saved, and checked when loaded into a model
    from unigen.training.tokenizer.vq_trainer import save_vq

    save_vq(local, tmp_path / "vq")
    assert load_vq(tmp_path / "vq").config.local_encoder is True


def test_amp_auto_uses_bf16_only_where_it_is_native(tmp_path, monkeypatch):
    from unigen.models import precision

    data = write_images(tmp_path, 4)
    # an AVX2-only CPU emulates bf16 (a Shapes VQ step ~10x slower): "auto" must leave autocast off there
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert VQTrainer(vq_config(tmp_path, data, amp="auto")).amp is False
    assert VQTrainer(vq_config(tmp_path, data, amp=True, overwrite=True)).amp is True
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert precision.resolve_amp("auto", torch.device("cpu")) is True
    assert precision.resolve_amp("auto", torch.device("cuda")) is True
    with pytest.raises(ValueError, match="amp must be true, false or auto, got 'bf16'"):
        VQTrainer(vq_config(tmp_path, data, amp="bf16", overwrite=True))


@pytest.mark.slow  # both trainers twice (~20 s); test_demo's end-to-end run trains side by side by default
def test_side_by_side_trains_what_each_trainer_would_alone(tmp_path):
    import multiprocessing

    from unigen.training.tokenizer.side_by_side import train_side_by_side
    from unigen.training.tokenizer.siglip_trainer import train_siglip
    from unigen.training.tokenizer.vq_trainer import train_vq

    data = write_images(tmp_path, 8)
    torch.set_num_threads(1)
    train_vq(vq_config(tmp_path / "alone", data, steps=3))
    train_siglip(siglip_config(tmp_path / "alone", data, steps=3))  # on 1 thread, as in its process below
    seconds = train_side_by_side(vq_config(tmp_path, data, steps=3), siglip_config(tmp_path, data, steps=3), threads=2)
    assert seconds > 0 and torch.get_num_threads() == 1 and not multiprocessing.active_children()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        # each trainer ran on 1 thread, then on 2 once the other was done (which one, timing decides):
        # sums differ in the last bits between thread counts
        assert torch.allclose(load_siglip(tmp_path / "siglip")(x), load_siglip(tmp_path / "alone" / "siglip")(x),
                              atol=1e-5)
        assert torch.allclose(load_vq(tmp_path / "vq")(x)[0], load_vq(tmp_path / "alone" / "vq")(x)[0], atol=1e-5)


def test_side_by_side_encoder_takes_every_thread_once_the_vq_is_done(monkeypatch):
    import multiprocessing

    from unigen.training.tokenizer import side_by_side

    threads_per_step = []

    def fake_train_siglip(cfg, bar_position, before_step, max_steps):
        assert max_steps == 4  # the run's --max-steps reaches the encoder's process
        for step in range(max_steps):
            if step == 2:
                vq_done.set()
            before_step()
            threads_per_step.append(torch.get_num_threads())

    monkeypatch.setattr(side_by_side, "train_siglip", fake_train_siglip)
    vq_done, (receive, send) = multiprocessing.Event(), multiprocessing.Pipe(duplex=False)
    before = torch.get_num_threads()
    try:
        side_by_side._siglip_worker(None, 1, 2, vq_done, send, 4)
    finally:
        torch.set_num_threads(before)
    assert threads_per_step == [1, 1, 2, 2]
    assert receive.recv() is None  # reported success


@pytest.mark.slow  # two spawned trainers (~16 s); the side-by-side success test runs by default
def test_side_by_side_reports_a_failed_encoder_and_stops_it_when_the_vq_fails(tmp_path):
    import multiprocessing

    from unigen.training.tokenizer.side_by_side import train_side_by_side

    data = write_images(tmp_path, 8)
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(RuntimeError, match=r"(?s)training the SigLIP encoder.*failed.*nowhere\.jsonl"):
        train_side_by_side(vq_config(tmp_path, data, steps=2), siglip_config(tmp_path, missing), threads=2)
    with pytest.raises(FileNotFoundError, match="nowhere"):  # the VQ's own error, unchanged
        train_side_by_side(vq_config(tmp_path, missing, overwrite=True), siglip_config(tmp_path, data, steps=100_000),
                           threads=2)
    assert not multiprocessing.active_children()  # the encoder's process did not outlive the failed VQ
    assert not (tmp_path / "siglip" / "model.safetensors").exists()
