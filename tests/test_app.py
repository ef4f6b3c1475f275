"""unigen app: the named endpoints through gradio_client, against an app this module starts on a free port with
the shipped Shapes checkpoint (the Shapes checker reads the generated images, the captions name rendered ones)."""

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from unigen.app import AppModel, start
from unigen.app.ui import DEFAULT_NUM_IMAGES, about_markdown
from unigen.cli import main
from unigen.generation.pipeline import UniGenPipeline
from unigen.recipes import recipe_path
from unigen.shapes import ShapeSpec, caption, check, render

PROMPT = "a large red circle at the top left"
TRIANGLE = ShapeSpec("blue", "triangle", "small", "bottom right")


@pytest.fixture(scope="module")
def served():
    pipe = UniGenPipeline.from_pretrained(recipe_path("checkpoints/shapes-small"))
    running = start(pipe, "checkpoints/shapes-small", port=0)
    yield running.url, pipe
    running.close()


@pytest.fixture
def client(served, tmp_path):
    return Client(served[0], verbose=False, analytics_enabled=False, download_files=str(tmp_path / "downloads"))


@pytest.fixture
def triangle_png(tmp_path):
    path = tmp_path / "triangle.png"
    render(TRIANGLE, seed=[5, 5]).pil().save(path)
    return path


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def solo_images(pipe, prompt: str, seeds: list[int]) -> list[np.ndarray]:
    """What the pipeline draws by itself, with the checkpoint's own sampling defaults."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return [np.asarray(img) for img in pipe(prompt, num_images_per_prompt=len(seeds), generator=generators).images]


def test_generate_takes_prompt_and_seed_and_the_checkpoints_defaults(served, client):
    gallery, files, done = client.predict(prompt=PROMPT, seed=7, api_name="/generate")
    assert done.startswith(f"{DEFAULT_NUM_IMAGES} image(s) in ") and done.endswith(" decoder passes (sequential)")
    assert len(gallery) == len(files) == DEFAULT_NUM_IMAGES
    assert [p.rsplit("/", 1)[-1] for p in files] == [f"unigen_seed{7 + i}.png" for i in range(DEFAULT_NUM_IMAGES)]
    expected = solo_images(served[1], PROMPT, list(range(7, 7 + DEFAULT_NUM_IMAGES)))
    for item, file, want in zip(gallery, files, expected, strict=True):
        np.testing.assert_array_equal(pixels(item["image"]), want)  # PNG all the way: no lossy format between
        np.testing.assert_array_equal(pixels(file), want)
    # the Shapes checker reads the prompt back; the checkpoint's fidelity is 0.955 (docs/EXPERIMENTS.md), so
    # two misses in four images would happen about once in a hundred seeds
    drawn = [check(Image.open(item["image"])) for item in gallery]
    assert drawn.count(ShapeSpec("red", "circle", "large", "top left")) >= DEFAULT_NUM_IMAGES - 1, drawn


def test_generate_options_reach_the_sampler(served, client):
    gallery, _, _ = client.predict(prompt=PROMPT, num_images=2, guidance_scale=1.0, temperature=0.0, top_k=5,
                                   top_p=0.9, seed=3, api_name="/generate")
    pipe = served[1]
    want = pipe(PROMPT, num_images_per_prompt=2, guidance_scale=1.0, temperature=0.0, top_k=5, top_p=0.9,
                generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).images
    assert [pixels(item["image"]).tolist() for item in gallery] == [np.asarray(img).tolist() for img in want]


@pytest.mark.parametrize("decoding, window", [("jacobi", 8), ("zipar", 0)])
def test_generate_decodes_with_the_chosen_method(served, client, decoding, window):
    gallery, _, done = client.predict(prompt=PROMPT, num_images=2, seed=11, decoding=decoding, decoding_window=window,
                                      api_name="/generate")
    options = {"window": window} if window else None
    want = served[1](PROMPT, num_images_per_prompt=2, generator=[torch.Generator().manual_seed(s) for s in (11, 12)],
                     decoding=decoding, decoding_options=options)
    assert [pixels(item["image"]).tolist() for item in gallery] == [np.asarray(img).tolist() for img in want.images]
    assert done.endswith(f", {want.decoder_passes} decoder passes ({decoding})")
    assert want.decoder_passes < served[1].model.config.vq.num_tokens  # fewer passes than one per token


def test_edit_endpoint_edits_the_uploaded_image(served, client, triangle_png):
    gallery, files = client.predict(image=handle_file(str(triangle_png)), instruction="make it red", num_images=2,
                                    seed=4, api_name="/edit")
    want = served[1].edit(str(triangle_png), "make it red", num_images_per_prompt=2,
                          generator=[torch.Generator().manual_seed(s) for s in (4, 5)]).images
    assert [pixels(item["image"]).tolist() for item in gallery] == [np.asarray(img).tolist() for img in want]
    assert [p.rsplit("/", 1)[-1] for p in files] == ["unigen_edit_seed4.png", "unigen_edit_seed5.png"]


def test_caption_names_the_rendered_image(client, triangle_png):
    assert client.predict(image=handle_file(str(triangle_png)), question="", api_name="/caption") == caption(TRIANGLE)


def test_chat_keeps_the_conversation_of_its_session(served, client, triangle_png):
    _, shown = client.predict(message={"text": "", "files": [handle_file(str(triangle_png))]}, api_name="/chat")
    assert shown[-1]["role"] == "assistant" and shown[-1]["content"][0]["text"] == caption(TRIANGLE)
    _, shown = client.predict(message={"text": "What colour is it?", "files": []}, api_name="/chat")
    # the second turn is answered with the first one (and its image) in the prompt, as pipe.chat would
    reply = served[1].chat([{"role": "user", "content": "Describe the image.", "images": [str(triangle_png)]},
                            {"role": "assistant", "content": caption(TRIANGLE)},
                            {"role": "user", "content": "What colour is it?"}])
    assert [m["role"] for m in shown] == ["user", "user", "assistant", "user", "assistant"]
    assert shown[-1]["content"][0]["text"] == reply
    other = Client(served[0], verbose=False, analytics_enabled=False)  # another session starts with nothing
    with pytest.raises(AppError, match="Type a question or attach an image"):
        other.predict(message={"text": " ", "files": []}, api_name="/chat")
    assert client.predict(api_name="/reset")[1] == []
    _, shown = client.predict(message={"text": "What colour is it?", "files": []}, api_name="/chat")
    assert len(shown) == 2  # the reset emptied this session's conversation
    assert shown[-1]["content"][0]["text"] == served[1].chat([{"role": "user", "content": "What colour is it?"}])


BAD_INPUTS = [  # (endpoint, arguments, what the message says)
    ("/generate", {"prompt": "  "}, "Enter a prompt"),
    ("/generate", {"prompt": PROMPT, "num_images": 0}, "Number of images must be between 1 and 16, got 0"),
    ("/generate", {"prompt": PROMPT, "num_images": 17}, "Number of images must be between 1 and 16, got 17"),
    ("/generate", {"prompt": PROMPT, "num_images": 2.5}, "Number of images must be a whole number, got 2.5"),
    ("/generate", {"prompt": PROMPT, "seed": -1}, "Seed must be between 0 and"),
    ("/generate", {"prompt": PROMPT, "top_p": 1.5}, "Top-p must be between 0.01 and 1, got 1.5"),
    ("/generate", {"prompt": PROMPT, "guidance_scale": -1}, "Guidance scale must be between 0 and 20, got -1"),
    ("/generate", {"prompt": PROMPT, "temperature": -0.5}, "Temperature must be between 0 and 2, got -0.5"),
    # the page's ranges hold for API calls too (issue 35): nothing the sliders would not offer
    ("/generate", {"prompt": PROMPT, "temperature": 1e308}, r"Temperature must be between 0 and 2, got 1e\+308"),
    ("/generate", {"prompt": PROMPT, "guidance_scale": 1e6}, r"Guidance scale must be between 0 and 20, got 1e\+06"),
    ("/generate", {"prompt": PROMPT, "top_p": 0.001}, "Top-p must be between 0.01 and 1, got 0.001"),
    ("/generate", {"prompt": PROMPT, "top_k": 513}, "Top-k must be between 0 and 512, got 513"),
    ("/generate", {"prompt": PROMPT, "decoding": "jacobi", "decoding_window": 10**6},
     r"Window must be between 0 and \d+, got 1000000"),
    ("/edit", {"image": "GOOD", "instruction": "make it blue", "temperature": 2.5},
     "Temperature must be between 0 and 2, got 2.5"),
    ("/edit", {"image": "GOOD", "instruction": "make it blue", "guidance_scale": 21},
     "Guidance scale must be between 0 and 20, got 21"),
    ("/generate", {"prompt": PROMPT, "top_k": -3}, "Top-k must be between 0 and 512, got -3"),
    ("/generate", {"prompt": PROMPT, "decoding": "fast"}, "Decoding must be one of sequential, jacobi, zipar"),
    ("/generate", {"prompt": PROMPT, "decoding": "jacobi", "decoding_window": -2}, "Window must be between 0 and"),
    # control tokens in the text (issue 35): refused with unigen's message, not a bare "Error"
    ("/generate", {"prompt": "<image_placeholder> a red circle"}, "the prompt must not contain <image_placeholder>"),
    ("/caption", {"image": "GOOD", "question": "what <begin_of_image> is it?"},
     "the question must not contain <begin_of_image>"),
    ("/caption", {"image": None, "question": ""}, "Upload an image for the question"),
    ("/edit", {"image": None, "instruction": "make it blue"}, "Upload an image for the edit"),
    ("/edit", {"image": "GOOD", "instruction": " "}, "the instruction is empty; say what to change"),
    ("/caption", {"image": "BAD", "question": ""}, "The uploaded file broken.png could not be read as an image"),
    ("/chat", {"message": {"text": "", "files": ["BAD"]}}, "The uploaded file broken.png could not be read"),
]


def test_bad_inputs_are_messages_and_the_app_keeps_serving(client, tmp_path, triangle_png):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a PNG")
    for endpoint, kwargs, message in BAD_INPUTS:
        files = {"BAD": handle_file(str(broken)), "GOOD": handle_file(str(triangle_png))}
        kwargs = {k: files.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
        if endpoint == "/chat":
            kwargs["message"]["files"] = [handle_file(str(broken)) if f == "BAD" else f
                                          for f in kwargs["message"]["files"]]
        with pytest.raises(AppError, match=message):
            client.predict(**kwargs, api_name=endpoint)
    assert client.predict(image=handle_file(str(triangle_png)), question="", api_name="/caption") == caption(TRIANGLE)


def test_ten_concurrent_generate_calls_get_their_own_images(served):
    url, pipe = served
    prompts = [PROMPT, "a small blue triangle at the bottom right", "a medium green square at the center"]
    jobs = [(prompts[i % len(prompts)], 100 + i) for i in range(10)]

    def call(job):
        prompt, seed = job
        session = Client(url, verbose=False, analytics_enabled=False)  # one session per caller
        gallery, _, _ = session.predict(prompt=prompt, num_images=1, seed=seed, api_name="/generate")
        return pixels(gallery[0]["image"])

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(call, jobs))
    for (prompt, seed), image in zip(jobs, got, strict=True):
        np.testing.assert_array_equal(image, solo_images(pipe, prompt, [seed])[0])


def test_about_names_the_checkpoints_defaults(served):
    model = AppModel(served[1], "checkpoints/shapes-small")
    text = about_markdown(model, concurrency=1)
    model.close()
    assert "| default guidance scale | 2 |" in text and "| default temperature | 1 |" in text
    assert "| fusion (how image features reach the decoder) | concat |" in text


def test_the_pages_ranges_are_the_ones_the_api_enforces_and_gradios_cache_is_capped(served):
    import gradio as gr

    from unigen.app import build_app
    from unigen.app.ui import CACHE_AGE_S, CACHE_SWEEP_S

    model = AppModel(served[1], "checkpoints/shapes-small")
    try:
        app = build_app(model)
    finally:
        model.close()
    shown = {}
    for block in app.blocks.values():
        if isinstance(block, gr.Slider | gr.Number) and block.label:
            shown.setdefault(block.label, set()).add((block.minimum, block.maximum))
    limits = model.limits
    assert shown["Guidance scale (1 = none)"] == {limits.guidance_scale} == {(0, 20)}
    assert shown["Temperature (0 = greedy)"] == {limits.temperature} == {(0, 2)}
    assert shown["Top-p (1 = off)"] == {limits.top_p} and shown["Top-k (0 = off)"] == {limits.top_k}
    assert shown["Number of images"] == {limits.num_images} and shown["Window (0 = the method's default)"] == \
        {limits.window} == {(0, served[1].model.config.vq.num_tokens)}
    assert app.delete_cache == (CACHE_SWEEP_S, CACHE_AGE_S)


def test_cli_names_a_taken_port_and_a_bad_one(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["app", "--port", str(port), "--device", "cpu"]) == 2
    assert f"error: cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["app", "--port", "70000"])
    assert exit_info.value.code == 2
    assert "a port is in [0, 65535] (0 = any free port), got 70000" in capsys.readouterr().err


@pytest.mark.slow
def test_unigen_app_command_serves_the_shipped_checkpoint_and_cleans_up_on_sigterm(tmp_path, triangle_png):
    """`unigen app --port 0` as a user starts it (a new process: imports and model load take ~10-25 s); SIGTERM
    stops it as Ctrl-C does: its download folder and Gradio's copies of what it served are gone."""
    temp, cache = tmp_path / "tmp", tmp_path / "gradio"
    temp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "unigen.cli", "app", "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(temp), GRADIO_TEMP_DIR=str(cache)))
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=180)  # the first line it prints names the URL
        assert line.startswith("unigen app: http://127.0.0.1:"), line
        session = Client(line.split()[2], verbose=False, analytics_enabled=False, download_files=str(tmp_path))
        assert session.predict(image=handle_file(str(triangle_png)), question="", api_name="/caption") == \
            caption(TRIANGLE)
        session.predict(prompt=PROMPT, num_images=1, api_name="/generate")
        assert [p.name.startswith("unigen-app-") for p in temp.iterdir()] == [True]
        assert any(p.is_file() for p in cache.rglob("*"))  # what it served, copied into Gradio's cache
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert list(temp.iterdir()) == [] and not any(p.is_file() for p in cache.rglob("*"))
    finally:
        proc.kill()
        proc.wait(timeout=30)
