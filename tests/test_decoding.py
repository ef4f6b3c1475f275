"""Parallel image decoding (unigen.generation.decoding): Jacobi and ZipAR against sequential decoding on tiny models."""

from dataclasses import fields

import pytest
import torch
from PIL import Image

from unigen import UniGenModel
from unigen.cli import main
from unigen.errors import ArgumentError
from unigen.generation.decoding.zipar import zipar_steps
from unigen.generation.pipeline import UniGenPipeline
from unigen.generation.sampling import generate_image_tokens
from unigen.generation.sampling_options import SamplingOptions
from unigen.testing import TINY_TOKENS as T
from unigen.testing import make_tiny_hf_janus


@pytest.fixture(scope="module")
def model(tiny_hf_janus):
    return UniGenModel.from_pretrained(tiny_hf_janus[1])


def prompts():
    """Two prompts, the first left padded."""
    ids = torch.tensor([[T.pad, T.pad, T.bos, 20, 21, 22, T.image_start],
                        [T.bos, 30, 31, 32, 33, 34, T.image_start]])
    return ids, (ids != T.pad).long()


def with_options(**kw) -> dict:
    """generate_image_tokens' keywords, the sampling ones (guidance, temperature, ..., decoding) as its options."""
    sampling = {f.name for f in fields(SamplingOptions)}
    return {**{k: v for k, v in kw.items() if k not in sampling},
            "options": SamplingOptions(**{k: v for k, v in kw.items() if k in sampling})}


def sample(model, **kw):
    ids, mask = prompts()
    return generate_image_tokens(model, ids, mask, num_images=2, **with_options(guidance_scale=3.0, **kw))


@pytest.mark.parametrize("window", [1, 3, 16])
def test_greedy_jacobi_gives_the_sequential_tokens(model, window):
    """CFG (both rows), a batch of two prompts x two images, left padding."""
    sequential = sample(model, temperature=0)
    jacobi = sample(model, temperature=0, decoding="jacobi", decoding_options={"window": window})
    assert torch.equal(jacobi.codes, sequential.codes)
    assert sequential.decoder_passes == model.config.vq.num_tokens  # the prefill + one pass per later token
    assert jacobi.decoder_passes < sequential.decoder_passes


def test_decoding_windows_are_bounded_by_the_models_image(model):
    """Issue 35: a window scales each pass's rows; past the image's tokens (Jacobi) or a grid row (ZipAR) it
    buys nothing, so it is refused in the model's terms before any pass runs."""
    n, grid = model.config.vq.num_tokens, model.config.vq.grid
    sample(model, temperature=0, decoding="jacobi", decoding_options={"window": n})  # the whole image: allowed
    for method, window, message in (("jacobi", n + 1, rf"window={n + 1} for 'jacobi' exceeds the image's {n} tokens"),
                                    ("jacobi", 10**8, rf"choose 1\.\.{n}$"),
                                    ("zipar", grid + 1, rf"exceeds the token grid's row width \({grid}\)")):
        with pytest.raises(ArgumentError, match=message):
            sample(model, decoding=method, decoding_options={"window": window})


def test_zipar_with_a_full_row_window_is_sequential_decoding(model):
    grid = model.config.vq.grid
    zipar = {"decoding": "zipar", "decoding_options": {"window": grid}}
    assert torch.equal(sample(model, temperature=0, **zipar).codes, sample(model, temperature=0).codes)
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(4)]
    sampled = sample(model, temperature=1.0, top_k=20, generator=gens(), **zipar)
    assert torch.equal(sampled.codes, sample(model, temperature=1.0, top_k=20, generator=gens()).codes)
    assert sampled.decoder_passes == grid * grid


@pytest.mark.parametrize("height, width, window", [(4, 4, 1), (4, 4, 2), (8, 8, 3), (24, 24, 6), (5, 7, 7)])
def test_zipar_draws_no_token_before_its_window(height, width, window):
    step = zipar_steps(height, width, window)
    for r in range(height):
        for c in range(width):
            if c:
                assert step[r, c] > step[r, c - 1]
            if r:  # the row above must have reached column c + window - 1 (or its end)
                assert step[r, c] > step[r - 1, min(c + window - 1, width - 1)]
    assert int(step.max()) + 1 == (height - 1) * window + width  # the number of passes: no idle step


@pytest.mark.parametrize("window", [1, 2])
def test_zipar_attends_only_to_drawn_tokens_before_it_in_raster_order(model, monkeypatch, window):
    """Each query of pass s sees the prompt, the tokens drawn in steps < s that precede its raster place
    (each once), and itself; a row-start query dropped after its pass is never seen again."""
    seen = []
    extend = model.decoder.extend

    def spy(x, cache, position_ids, visible, cross=None):
        seen.append((cache.length, position_ids.clone(), visible.clone()))
        return extend(x, cache, position_ids, visible, cross)

    monkeypatch.setattr(model.decoder, "extend", spy)
    ids, mask = prompts()
    generate_image_tokens(model, ids, mask, options=SamplingOptions(temperature=0, decoding="zipar",
                                                                     decoding_options={"window": window}))
    grid = model.config.vq.grid
    step = zipar_steps(grid, grid, window).flatten()
    prompt_len, place_of_column = ids.shape[1], []
    base = mask.sum(1).repeat(2)  # each row's rotary position of image token 0 (padding takes none)
    assert len(seen) == (grid - 1) * window + grid - 1  # passes after the prefill
    for s, (length, positions, visible) in enumerate(seen, start=1):
        places = positions - base[:, None]
        assert (places == places[0]).all()  # every row (image, guidance half) queries the same places
        place_of_column += places[0].tolist()
        for row in range(visible.shape[0]):
            assert torch.equal(visible[row, :, :prompt_len], mask.repeat(2, 1)[row].bool().expand(len(places[0]), -1))
        for j, place in enumerate(places[0].tolist()):
            columns = visible[0, j, prompt_len:].nonzero()[:, 0].tolist()
            assert length + j - prompt_len in columns  # itself
            others = sorted(place_of_column[c] for c in columns if c != length + j - prompt_len)
            assert others == [t for t in range(place) if step[t] <= s - 1]


@pytest.mark.slow
def test_compiled_decode_step_gives_the_eager_logits(model):
    _check_captured_step(model, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph step needs a CUDA device")
def test_cuda_graph_decode_step_gives_the_eager_logits(tiny_hf_janus):
    _check_captured_step(UniGenModel.from_pretrained(tiny_hf_janus[1]).cuda(), torch.device("cuda"))


def _check_captured_step(model, device):
    """Three steps of the captured step (torch.compile on CPU, a CUDA graph on CUDA) against the eager step,
    on the same prefill: logits to 1e-5 in float32."""
    from unigen.generation.decoding.replay import decode_step_for

    ids, mask = (t.to(device) for t in prompts())
    codes = torch.tensor([[5, 9, 2], [7, 7, 1]], device=device)
    logits = []
    for compile in (False, True):
        cache = model.decoder.new_cache(2, ids.shape[1] + 4)
        with torch.no_grad():
            model.decoder(model.embed_text(ids), mask, cache=cache)
            step = decode_step_for(model.decoder, cache, compile)
            run = []
            for i in range(3):
                hidden = step(model.embed_image_tokens(codes[:, i : i + 1]), cache)[:, -1]
                cache.length += 1
                run.append(model.gen_head(hidden).clone())
        logits.append(torch.stack(run))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)


# ---- the pipeline, the command line, bad input --------------------------------------------------------------


def test_pipeline_reports_decoder_passes(tiny_hf_janus):
    pipe = UniGenPipeline.from_pretrained(tiny_hf_janus[1])
    n_tokens = pipe.model.config.vq.num_tokens
    sequential = pipe(["a red circle", "a blue square"], temperature=0)
    jacobi = pipe(["a red circle", "a blue square"], temperature=0, decoding="jacobi")
    assert sequential.decoder_passes == n_tokens
    assert jacobi.decoder_passes < n_tokens and torch.equal(jacobi.tokens, sequential.tokens)
    zipar = pipe("a red circle", decoding="zipar", decoding_options={"window": 1},
                 generator=torch.Generator().manual_seed(0))
    assert zipar.decoder_passes == (4 - 1) * 1 + 4 and len(zipar.images) == 1
    source = Image.new("RGB", (32, 32), (200, 30, 30))  # an edit is image-conditioned generation: the same decoders
    edit_seq = pipe.edit(source, "make it blue", temperature=0)
    edit_jacobi = pipe.edit(source, "make it blue", temperature=0, decoding="jacobi")
    assert edit_seq.decoder_passes == n_tokens and edit_jacobi.decoder_passes < n_tokens
    assert torch.equal(edit_jacobi.tokens, edit_seq.tokens)


def test_cli_generate_takes_a_decoding_method_and_prints_the_passes(tiny_hf_janus, tmp_path, capsys):
    rc = main(["generate", "a red circle", "--model", str(tiny_hf_janus[1]), "--num-images", "2", "--device", "cpu",
               "--output-dir", str(tmp_path), "--decoding", "zipar", "--decoding-option", "window=2"])
    assert rc == 0
    assert "decoder passes: 10 (zipar decoding)" in capsys.readouterr().err  # (4 - 1) * 2 + 4, one batch
    assert (tmp_path / "image_001.png").exists()


@pytest.mark.parametrize("kw, message", [
    ({"decoding": "beam"}, "unknown decoding method 'beam'; choose one of sequential, jacobi, zipar"),
    ({"decoding": "jacobi", "decoding_options": {"size": 4}},
     "unknown option(s) size for decoding 'jacobi'; its options: window"),
    ({"decoding": "sequential", "decoding_options": {"window": 4}},
     "unknown option(s) window for decoding 'sequential'; its options: none"),
    ({"decoding": "jacobi", "decoding_options": {"window": 0}}, "decoding option window must be at least 1, got 0"),
    ({"decoding": "zipar", "decoding_options": {"window": 2.5}}, "decoding option window must be a whole number"),
    ({"decoding": "zipar", "decoding_options": {"window": 5}},
     "window=5 for 'zipar' exceeds the token grid's row width (4); choose 1..4"),
    ({"decoding": "jacobi", "compile": True}, "compile captures the one-token decode step of 'sequential'"),
    ({"pixel_values": torch.zeros(1, 3, 32, 32)}, "pixel_values holds 1 image(s) but the prompts have placeholders "
                                                  "for 0"),
])
def test_bad_decoding_requests_are_named(model, kw, message):
    ids, mask = prompts()
    with pytest.raises(ArgumentError) as err:
        generate_image_tokens(model, ids, mask, **with_options(**kw))
    assert message in str(err.value)


@pytest.mark.parametrize("flags, message", [
    (["--decoding", "beam"], "argument --decoding: invalid choice: 'beam'"),
    (["--decoding-option", "window"], "--decoding-option expects key=value, got 'window'"),
    (["--decoding", "jacobi", "--decoding-option", "window=x"], "--decoding-option window: expected a whole number"),
    (["--decoding", "zipar", "--decoding-option", "depth=2"], "unknown option(s) depth for decoding 'zipar'"),
])
def test_cli_names_bad_decoding_flags_before_loading(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) if "invalid choice" in message else _no_exit():
        code = main(["generate", "a cat", "--model", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "o"),
                     *flags])
        assert code == 2
    assert message in capsys.readouterr().err


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---- sampled Jacobi keeps the distribution --------------------------------------------------------------

DRAWS = 4000
GUIDANCE = 2.0


@pytest.fixture(scope="module")
def small_codebook(tmp_path_factory):
    """A tiny model with 8 codes, so that exact token distributions can be enumerated."""
    directory = tmp_path_factory.mktemp("codebook8")
    make_tiny_hf_janus(directory, seed=3, codebook=8)
    return UniGenModel.from_pretrained(directory)


def exact_joint(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """P(tokens 0..n-1) under sequential guided sampling (temperature 1), enumerated: (vocab,) * n."""
    vocab = model.config.vq.codebook_size
    prefixes, joint = torch.zeros(1, 0, dtype=torch.long), torch.ones(1)
    uncond = torch.where((prompt == T.bos) | (prompt == T.image_start), prompt, T.cfg_pad)
    for i in range(n):
        k = prefixes.shape[0]
        codes = torch.cat([prefixes, torch.zeros(k, 1, dtype=torch.long)], 1)
        with torch.no_grad():
            c = model.image_logits(prompt.expand(k, -1), codes)[:, i]
            u = model.image_logits(uncond.expand(k, -1), codes)[:, i]
        joint = ((u + GUIDANCE * (c - u)).softmax(-1) * joint[:, None]).flatten()
        prefixes = torch.cat([prefixes.repeat_interleave(vocab, 0), torch.arange(vocab).repeat(k)[:, None]], 1)
    return joint.view((vocab,) * n)


def histogram(codes: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(codes, minlength=vocab).float() / codes.numel()


@pytest.mark.slow  # thousands of sampled draws (~11 s); the greedy Jacobi tests check the decoder by default
def test_sampled_jacobi_keeps_the_sampling_distribution(small_codebook):
    """Token frequencies over 4000 draws against the exact distribution (positions 0-2, where every
    acceptance case occurs: a guessed draft, a Jacobi-updated draft, a re-verified fixed token) and against
    sequential sampling (later positions). Sampling noise in total variation is about 0.02 at 8 codes and
    4000 draws (0.03 between two samples); the bounds leave 2.5x that. Accepting every draft, accepting
    with p(d) instead of p(d) / q(d), or drawing a rejected place from p instead of the residual each fail
    it (checked by breaking the rule on purpose)."""
    model = small_codebook
    vocab = model.config.vq.codebook_size
    prompt = torch.tensor([[T.bos, 20, 21, T.image_start]])
    jacobi = generate_image_tokens(model, prompt, num_images=DRAWS, generator=torch.Generator().manual_seed(0),
                                   options=SamplingOptions(guidance_scale=GUIDANCE, temperature=1.0,
                                                           decoding="jacobi", decoding_options={"window": 4})).codes
    sequential = generate_image_tokens(model, prompt, num_images=DRAWS, generator=torch.Generator().manual_seed(1),
                                       options=SamplingOptions(guidance_scale=GUIDANCE, temperature=1.0)).codes
    joint = exact_joint(model, prompt, 3)
    for i, exact in enumerate([joint.sum((1, 2)), joint.sum((0, 2)), joint.sum((0, 1))]):
        assert 0.5 * (histogram(jacobi[:, i], vocab) - exact).abs().sum() < 0.05, i
    # how often a token repeats the one before: the first drafts guess exactly that, so a wrong rule for
    # rejected guesses shows here first (noise: 0.006 standard error; a missing residual adds 0.12)
    pair_01, pair_12 = joint.sum(2), joint.sum(0)
    for i, pair in ((1, pair_01), (2, pair_12)):
        assert abs((jacobi[:, i] == jacobi[:, i - 1]).float().mean() - pair.diagonal().sum()) < 0.03, i
    for i in (5, 10, 15):
        tv = 0.5 * (histogram(jacobi[:, i], vocab) - histogram(sequential[:, i], vocab)).abs().sum()
        assert tv < 0.075, i
