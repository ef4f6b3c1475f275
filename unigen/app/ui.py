"""The page: Generate, Understand, Edit and About tabs over one :class:`AppModel`, and the named endpoints that
``gradio_client`` scripts call (``/generate``, ``/caption``, ``/chat``, ``/edit``)."""

from __future__ import annotations

import gradio as gr

from unigen.app.requests import AppModel, Limits
from unigen.generation.decoding import DECODING_METHODS
from unigen.generation.editing import CFG_DROPS, DEFAULT_CFG_DROP

MODEL_QUEUE = "model"  # one concurrency group for every event that runs the model: they share its cores
DEFAULT_NUM_IMAGES = 4
EXAMPLE_PROMPT = "a large red circle at the top left"
CACHE_SWEEP_S, CACHE_AGE_S = 600, 3600  # a served image stays in Gradio's cache for an hour at most


def about_markdown(model: AppModel, concurrency: int) -> str:
    c = model.config
    params = sum(p.numel() for p in model.pipe.model.parameters())
    rows = [
        ("checkpoint", f"`{model.name}`"),
        ("device, dtype", f"{model.pipe.device}, {model.pipe.model.dtype}".replace("torch.", "")),
        ("parameters", f"{params / 1e6:.1f} M"),
        ("fusion (how image features reach the decoder)", c.fusion),
        ("understanding encoder", f"{c.encoder}, {c.vision.image_size} px, {c.vision.num_tokens} tokens per image"),
        ("decoder", f"{c.llm.num_layers} layers, width {c.llm.hidden_size}, {c.llm.num_heads} heads, "
                    f"vocabulary {c.llm.vocab_size}"),
        ("image tokenizer", f"VQ, {c.vq.image_size} px, codebook {c.vq.codebook_size}"),
        ("prompt format", c.prompt_format),
        ("default guidance scale", f"{c.guidance_scale:g}"),
        ("default temperature", f"{c.temperature:g}"),
        ("requests running at once", f"{concurrency} (the rest wait in a queue, in order)"),
    ]
    return "| | this app |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def guidance_and_temperature(limits: Limits, config) -> tuple[gr.Slider, gr.Slider]:
    """Image sampling sliders over the ranges the requests enforce, starting at the checkpoint's own defaults
    (so an API call that leaves them out samples as the checkpoint says)."""
    return (gr.Slider(*limits.guidance_scale, value=config.guidance_scale, step=0.1, label="Guidance scale (1 = none)"),
            gr.Slider(*limits.temperature, value=config.temperature, step=0.05, label="Temperature (0 = greedy)"))


def generate_tab(model: AppModel, run_model: dict) -> None:
    """Prompt -> images: the ``/generate`` endpoint."""
    with gr.Tab("Generate", id="generate"):
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", placeholder=EXAMPLE_PROMPT, scale=4, elem_id="prompt")
            go = gr.Button("Generate", variant="primary", scale=1, elem_id="generate-button")
        with gr.Row():
            num_images = gr.Slider(*model.limits.num_images, value=DEFAULT_NUM_IMAGES, step=1,
                                   label="Number of images")
            seed = gr.Number(0, precision=0, label="Seed (image i uses seed + i)")
        with gr.Accordion("Sampling", open=False):
            with gr.Row():
                guidance, temperature = guidance_and_temperature(model.limits, model.config)
                top_k = gr.Number(0, precision=0, label="Top-k (0 = off)", minimum=model.limits.top_k[0],
                                  maximum=model.limits.top_k[1])
                top_p = gr.Slider(*model.limits.top_p, value=1.0, step=0.01, label="Top-p (1 = off)")
            with gr.Row():
                decoding = gr.Dropdown(list(DECODING_METHODS), value="sequential", label="Decoding",
                                       info="jacobi: the same images in fewer passes; zipar: rows in parallel, "
                                            "an approximation")
                window = gr.Number(0, precision=0, label="Window (0 = the method's default)",
                                   minimum=model.limits.window[0], maximum=model.limits.window[1])
        gallery = gr.Gallery(label="Images", format="png", columns=4, fit_columns=False, elem_id="gallery",
                             buttons=["download", "fullscreen"])
        done = gr.Markdown(elem_id="generate-info")
        files = gr.File(label="PNG files", file_count="multiple", elem_id="downloads")
        gr.Examples([[EXAMPLE_PROMPT], ["a small blue triangle at the bottom right"]], inputs=[prompt])
        gr.on([go.click, prompt.submit], model.generate,
              [prompt, num_images, guidance, temperature, top_k, top_p, seed, decoding, window],
              [gallery, files, done], api_name="generate", **run_model)


def understand_tab(model: AppModel, run_model: dict) -> None:
    """The chat about images (``/chat``) and one image, one question (``/caption``)."""
    with gr.Tab("Understand", id="understand"):
        conversation = gr.State([])
        chatbot = gr.Chatbot(label="Chat about images", height=520, elem_id="chatbot", buttons=["copy"],
                             feedback_options=None)
        box = gr.MultimodalTextbox(placeholder="Attach images and ask (empty: describe the image)",
                                   file_types=["image"], file_count="multiple", sources=["upload"],
                                   elem_id="chat-input", show_label=False)
        reset = gr.Button("New conversation", elem_id="reset")
        box.submit(model.chat, [box, conversation], [box, chatbot, conversation], api_name="chat",
                   **run_model)
        reset.click(lambda: ({"text": "", "files": []}, [], []), None, [box, chatbot, conversation],
                    api_name="reset", queue=False)
        with gr.Accordion("One image, one question", open=False):
            with gr.Row():
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"],
                                 elem_id="caption-image")
                with gr.Column():
                    question = gr.Textbox(label="Question (empty: describe the image)")
                    ask = gr.Button("Ask", elem_id="caption-button")
                    answer = gr.Textbox(label="Answer", elem_id="caption-answer", interactive=False)
            gr.on([ask.click, question.submit], model.caption, [image, question], answer,
                  api_name="caption", **run_model)


def edit_tab(model: AppModel, run_model: dict) -> None:
    """Source image + instruction -> edited images: the ``/edit`` endpoint."""
    with gr.Tab("Edit", id="edit"):
        with gr.Row():
            source = gr.Image(type="filepath", label="Source image", sources=["upload", "clipboard"],
                              elem_id="edit-source", height=320)
            with gr.Column():
                instruction = gr.Textbox(label="Instruction", placeholder="make it blue", elem_id="instruction")
                edit_go = gr.Button("Edit", variant="primary", elem_id="edit-button")
                edit_images = gr.Slider(*model.limits.num_images, value=1, step=1, label="Number of images")
                edit_seed = gr.Number(0, precision=0, label="Seed (image i uses seed + i)")
                with gr.Accordion("Sampling", open=False):
                    edit_guidance, edit_temperature = guidance_and_temperature(model.limits, model.config)
                    cfg_drop = gr.Dropdown(list(CFG_DROPS), value=DEFAULT_CFG_DROP,
                                           label="Guidance compares with the prompt without its")
        edited = gr.Gallery(label="Edited", format="png", columns=4, fit_columns=False, elem_id="edited",
                            buttons=["download", "fullscreen"])
        edited_files = gr.File(label="PNG files", file_count="multiple")
        gr.on([edit_go.click, instruction.submit], model.edit,
              [source, instruction, edit_images, edit_guidance, edit_temperature, edit_seed, cfg_drop],
              [edited, edited_files], api_name="edit", **run_model)


def build_app(model: AppModel, concurrency: int = 1, max_queue: int = 64) -> gr.Blocks:
    """The Blocks app, queued: ``concurrency`` model requests run at a time over all sessions, up to
    ``max_queue`` wait (further ones are refused with a message)."""
    # Every event that runs the model: one queue; and unigen.app.requests checks the raw inputs itself, so
    # that a number out of range or an unreadable upload is named in its words, not Gradio's.
    run_model = dict(concurrency_id=MODEL_QUEUE, concurrency_limit=concurrency, preprocess=False)
    # delete_cache: Gradio keeps a copy of every image it serves; files older than CACHE_AGE_S go every
    # CACHE_SWEEP_S, and all of them when the server stops, so a long-running app does not fill the disk
    with gr.Blocks(title="unigen", analytics_enabled=False, delete_cache=(CACHE_SWEEP_S, CACHE_AGE_S)) as app:
        gr.Markdown(f"## unigen: `{model.name}`")
        generate_tab(model, run_model)
        understand_tab(model, run_model)
        edit_tab(model, run_model)
        with gr.Tab("About the model", id="about"):
            gr.Markdown(about_markdown(model, concurrency))
    return app.queue(max_size=max_queue, default_concurrency_limit=concurrency)
