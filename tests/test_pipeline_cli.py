"""UniGenPipeline and the generate / caption / eval commands on a tiny checkpoint."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unigen import UniGenModel
from unigen.cli import main
from unigen.errors import ArgumentError
from unigen.generation.pipeline import UniGenPipeline, resolve_device
from unigen.generation.sampling import generate_text
from unigen.generation.sampling_options import SamplingOptions


@pytest.fixture(scope="module")
def pipe(tiny_hf_janus):
    return UniGenPipeline.from_pretrained(tiny_hf_janus[1])


def test_pipeline_generates_pil_images(pipe):
    out = pipe(["a red circle", "a blue square at the top"], num_images_per_prompt=2,
               generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 4 and out.tokens.shape == (4, 16)
    assert all(img.size == (16, 16) and img.mode == "RGB" for img in out.images)
    expected = ((pipe.model.decode_image_tokens(out.tokens) + 1) / 2 * 255).clamp(0, 255).to(torch.uint8)
    assert torch.equal(torch.from_numpy(np.array(out.images[3])).permute(2, 0, 1), expected[3])


def test_caption_matches_generate_text(pipe):
    img = Image.new("RGB", (20, 10), (200, 30, 30))
    batch = pipe.processor.understanding_inputs([img], "Describe the image.")
    ids = generate_text(pipe.model, batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
                        max_new_tokens=6)[0]
    text = pipe.caption(img, max_new_tokens=6)
    assert isinstance(text, str) and text == pipe.processor.decode(ids)
    assert pipe.caption([img, img], max_new_tokens=6) == [text, text]


def test_pipeline_save_and_reload(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    again = UniGenPipeline.from_pretrained(tmp_path)
    g = lambda: torch.Generator().manual_seed(3)
    assert torch.equal(again("a cat", generator=g()).tokens, pipe("a cat", generator=g()).tokens)
    assert isinstance(UniGenModel.from_pretrained(tmp_path), UniGenModel)


def test_checkpoint_carries_its_default_guidance_scale(pipe, tmp_path):
    assert pipe.model.config.guidance_scale == 5.0  # Janus's scale for Janus checkpoints
    pipe.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["guidance_scale"] == 5.0
    (tmp_path / "config.json").write_text(json.dumps({**config, "guidance_scale": 1.5}))
    again = UniGenPipeline.from_pretrained(tmp_path)
    g = lambda: torch.Generator().manual_seed(4)
    default = again(["a cat", "a dog"], generator=g()).tokens
    assert torch.equal(default, again(["a cat", "a dog"], guidance_scale=1.5, generator=g()).tokens)
    assert not torch.equal(default, again(["a cat", "a dog"], guidance_scale=5.0, generator=g()).tokens)


def test_checkpoint_carries_its_default_temperature(pipe, tmp_path):
    assert pipe.model.config.temperature == 1.0  # Janus samples at 1
    pipe.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "temperature": 0.0}))
    again = UniGenPipeline.from_pretrained(tmp_path)
    assert again.model.config.temperature == 0.0
    default = again(["a cat", "a dog"], generator=torch.Generator().manual_seed(5)).tokens
    greedy = again(["a cat", "a dog"], temperature=0.0, generator=torch.Generator().manual_seed(6)).tokens
    assert torch.equal(default, greedy)  # greedy: the seed does not matter
    sampled = again(["a cat", "a dog"], temperature=1.0, generator=torch.Generator().manual_seed(5)).tokens
    assert not torch.equal(default, sampled)


def test_options_and_sampling_keywords_together_are_refused(pipe):
    """``options=`` used to replace the keywords silently; now both at once is an ArgumentError naming them."""
    opts = SamplingOptions(guidance_scale=2.0, temperature=0.0)
    g = lambda: torch.Generator().manual_seed(7)
    assert torch.equal(pipe("a cat", options=opts, generator=g()).tokens,
                       pipe("a cat", guidance_scale=2.0, temperature=0.0, generator=g()).tokens)
    with pytest.raises(ArgumentError, match=r"either as options= or as keyword arguments, not both \(got options= "
                                            r"and guidance_scale, top_k\)"):
        pipe("a cat", options=opts, guidance_scale=3.0, top_k=5)
    with pytest.raises(ArgumentError, match=r"not both \(got options= and decoding\)"):
        pipe("a cat", options=opts, decoding="jacobi")
    img = Image.new("RGB", (8, 8))
    with pytest.raises(ArgumentError, match=r"not both \(got options= and temperature\)"):
        pipe.caption(img, temperature=0.5, options=SamplingOptions())
    with pytest.raises(ArgumentError, match=r"not both \(got options= and top_p\)"):
        pipe.chat([{"role": "user", "content": "hi"}], top_p=0.5, options=SamplingOptions())
    with pytest.raises(ArgumentError, match=r"not both \(got options= and guidance_scale\)"):
        pipe.edit(img, "make it blue", guidance_scale=2.0, options=opts)


def test_model_output_and_input_errors_use_transformers_names_and_unigen_errors(pipe):
    ids = torch.tensor([[pipe.model.config.tokens.bos, 20, 21]])
    with torch.no_grad():
        out = pipe.model(ids)
        hidden = pipe.model.run_decoder(pipe.model.embed_text(ids)).last_hidden_state
    assert torch.equal(out.last_hidden_state, hidden) and not hasattr(out, "hidden_states")
    with pytest.raises(ArgumentError, match="pass exactly one of input_ids and inputs_embeds"):
        pipe.model()
    with pytest.raises(ArgumentError, match="but no pixel_values were given"):
        pipe.model(torch.tensor([[pipe.model.config.image_token_id]]))
    with pytest.raises(ArgumentError, match=r"pixel_values must have shape \(n_images, 3, 32, 32\)"):
        pipe.model.get_image_features(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ArgumentError, match="1 images but 2 questions"):
        pipe.processor.understanding_inputs([Image.new("RGB", (8, 8))], ["a", "b"])


def test_generate_text_takes_pixel_values_by_keyword_only(pipe):
    ids = torch.tensor([[pipe.model.config.tokens.bos, 20]])
    with pytest.raises(TypeError, match="positional argument"):
        generate_text(pipe.model, ids, None, torch.zeros(1, 3, 32, 32))


def test_unknown_or_missing_device():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_cli_generate_writes_pngs_and_grid(tiny_hf_janus, tmp_path, capsys):
    rc = main(["generate", "a red circle", "--model", str(tiny_hf_janus[1]), "--num-images", "3", "--seed", "1",
               "--output-dir", str(tmp_path), "--device", "cpu"])
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "image_000.png", "image_001.png",
                                                         "image_002.png"]
    assert Image.open(tmp_path / "grid.png").size == (32, 32)
    with pytest.raises(SystemExit) as err:
        main(["generate", "x", "--model", str(tiny_hf_janus[1]), "--device", "tpu"])
    assert err.value.code == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


def test_cli_caption_reports_bad_images_and_captions_the_rest(tiny_hf_janus, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), (10, 200, 10)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    rc = main(["caption", str(good), str(bad), str(tmp_path / "missing.png"), "--model", str(tiny_hf_janus[1]),
               "--max-new-tokens", "4", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert out.startswith(f"{good}\t") and out.count("\n") == 1
    assert "bad.png could not be decoded" in err and "missing.png does not exist" in err
    assert "2 image(s) could not be read" in err


def test_cli_eval_shapes_writes_json(tiny_hf_janus, tmp_path, capsys):
    rc = main(["eval", "shapes", "--model", str(tiny_hf_janus[1]), "--n", "3", "--json", str(tmp_path / "s.json"),
               "--device", "cpu"])
    assert rc == 0
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["captioning"]["n"] == 3 and result["generation"]["n"] == 3
    assert set(result["generation"]["per_attribute"]) == {"color", "shape", "size", "position"}
    assert result["guidance_scale"] == 5.0  # the checkpoint's defaults, recorded with the scores
    assert result["temperature"] == 1.0
    assert "| captioning |" in capsys.readouterr().out


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``unigen ARGV`` run in this process."""
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("flags, message", [
    (["--num-images", "0"], "--num-images: must be at least 1, got 0"),
    (["--guidance-scale", "-1"], "guidance_scale must be >= 0"),
    (["--guidance-scale", "nan"], "--guidance-scale: expected a finite number, got 'nan'"),
    (["--temperature", "inf"], "--temperature: expected a finite number, got 'inf'"),
    (["--top-p", "0"], r"top_p must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], r"top_p must be in (0, 1], got 1.5"),
    (["--temperature", "-0.5"], "temperature must be >= 0"),
    (["--cfg-schedule", "cosine"], "unknown cfg_schedule 'cosine'"),
    (["--cfg-schedule", "cutoff:x"], "expected cutoff:K"),
    (["--seed", str(2**64)], "a seed must be in [0, 2**63 - 1]"),
])
def test_cli_generate_rejects_bad_flags_before_loading(tmp_path, capsys, flags, message):
    # the model path does not exist: the flag must be named before any load is tried
    code, out, err = run_cli(["generate", "a cat", "--model", str(tmp_path / "nowhere"), "--device", "cpu",
                              "--output-dir", str(tmp_path / "out"), *flags], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_cli_generate_names_a_prompt_too_long_for_the_context(tiny_hf_janus, tmp_path, capsys):
    long_prompt = " ".join(["red"] * 600)
    code, _, err = run_cli(["generate", long_prompt, "--model", str(tiny_hf_janus[1]), "--device", "cpu",
                            "--output-dir", str(tmp_path)], capsys)
    assert code == 2  # an argument error (a usage mistake), not a fault of the checkpoint
    assert "16 image tokens exceeds the context of 512; shorten the prompt to at most 496 tokens" in err
    assert "Traceback" not in err and not any(tmp_path.iterdir())


def test_cli_caption_rejects_bad_flags_before_loading(tmp_path, capsys):
    for flags, message in ((["--temperature", "-1"], "temperature must be >= 0"),
                           (["--temperature", "nan"], "expected a finite number, got 'nan'"),
                           (["--batch-size", "0"], "--batch-size: must be at least 1")):
        code, _, err = run_cli(["caption", str(tmp_path / "x.png"), "--model", str(tmp_path / "nowhere"), *flags],
                               capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_cli_help_documents_every_flag(capsys):
    """Every flag of every command has a help line, the --help page prints it, and a flag with a default
    says what the default is."""
    from unigen.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        with pytest.raises(SystemExit):
            main([name, "--help"])
        page = " ".join(capsys.readouterr().out.split())
        for action in command._actions:
            if action.dest == "help":
                continue
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
            assert " ".join(action.help.split())[:40] in page, (name, action.dest)
            has_default = action.default not in (None, False, [], ()) and action.option_strings
            assert not has_default or "default" in action.help, (name, action.dest, action.default)


def test_demo_takes_the_training_vocabulary_and_its_old_spellings_warn(capsys):
    """unigen demo says --output-dir and --config like unigen train; --out-dir and --recipe still work, each with a
    one-line deprecation warning naming the new flag."""
    from unigen.cli import build_parser

    parser = build_parser()
    new = parser.parse_args(["demo", "--output-dir", "d1", "--config", "train/smoke.yaml"])
    assert capsys.readouterr().err == ""
    old = parser.parse_args(["demo", "--out-dir", "d1", "--recipe", "train/smoke.yaml"])
    assert (old.output_dir, old.config) == (new.output_dir, new.config) and new.output_dir == "d1"
    assert Path(new.config).name == "smoke.yaml"
    assert capsys.readouterr().err.splitlines() == ["warning: --out-dir is deprecated; pass --output-dir instead",
                                                    "warning: --recipe is deprecated; pass --config instead"]
