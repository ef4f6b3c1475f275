"""The Shapes demo: data -> train/from-scratch.yaml's whole run (visual tokenizers, VQ codes, three stages, in
``OUTPUT_DIR/model``, unigen.training.run_plan) -> samples, captions, scores.

Everything is trained from scratch on this machine; ``demo_out/index.html`` shows the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from unigen.recipes import recipe_path

DEMO_TASKS = ("caption", "generation", "edit")
DEMO_PROMPTS = ["a large red circle at the top left", "a small blue square at the center",
                "a large yellow triangle at the bottom", "a small green diamond at the right",
                "a large purple square at the bottom right", "a small white circle at the top",
                "a large cyan diamond at the left", "a small orange triangle at the bottom left"]

# the tokenizer steps of a recipe that names none (train/shapes.yaml and the like)
SHAPES_TOKENIZERS = {"vq": {"config": "tokenizers/vq-shapes.yaml"},
                     "siglip": {"config": "tokenizers/siglip-shapes.yaml"}}


@dataclass
class DemoConfig:
    out_dir: str = "demo_out"
    n_train: int = 5000
    vq_steps: int = 1000
    vq_warmup_steps: int = 100  # autoencoder warm-up, then the k-means codebook (VQTrainConfig.ae_warmup_steps)
    # the recipe keeps the encoder frozen in stage II, as Janus does, so how well it reads shapes caps the
    # captions: it gets a long run of its own
    siglip_steps: int = 2500
    stage_steps: tuple[int, int, int] | None = None  # None: the recipe's
    # a binomial score's standard error sqrt(p (1 - p) / n) nears 0.03 at n = 200, as wide as the targets' margins
    n_eval: int = 600
    seed: int = 0
    threads: int = 2
    recipe: str = str(recipe_path("train/from-scratch.yaml"))  # a recipe without tokenizers: gets SHAPES_TOKENIZERS
    vq_from: str | None = None  # a trained VQ tokenizer to reuse instead of training one
    siglip_from: str | None = None  # a trained SigLIP encoder to reuse instead of training one
    overrides: tuple[str, ...] = ()  # recipe key=value overrides
    # what the model is trained on and scored for: captions and generation come from the caption lines; "edit"
    # adds as many edit triples (unigen.shapes.editing), which train in the generation share of the mixture
    tasks: tuple[str, ...] = ("caption", "generation")
    # how the training images are drawn (unigen.shapes.data.DATASET_STYLES): both renderers, so that the model
    # reads and draws the world, not one renderer's look
    render_style: str = "mixed"

    def __post_init__(self):
        # checked here, before minutes of data and tokenizer work, and in the demo's own flag names
        from unigen.errors import ArgumentError
        from unigen.shapes.data import DATASET_STYLES

        if self.render_style not in DATASET_STYLES:
            raise ArgumentError(f"--render-style must be one of {list(DATASET_STYLES)}, got {self.render_style!r}")
        unknown = sorted(set(self.tasks) - set(DEMO_TASKS))
        if unknown or not self.tasks:
            raise ArgumentError(f"--tasks: unknown or no task(s) {unknown}; choose from {list(DEMO_TASKS)}")
        for name in ("n_train", "vq_steps", "siglip_steps", "n_eval", "threads"):
            if getattr(self, name) < 1:
                raise ArgumentError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.stage_steps is not None and min(self.stage_steps) < 1:
            raise ArgumentError(f"--stage-steps must all be at least 1, got {list(self.stage_steps)}")
        if self.vq_from is None and not 0 <= self.vq_warmup_steps < self.vq_steps:
            raise ArgumentError(f"--vq-warmup-steps must be in [0, --vq-steps) = [0, {self.vq_steps}), got "
                             f"{self.vq_warmup_steps}: lower it (0 turns the warm-up off) or raise --vq-steps")


def _timed(timings: dict, name: str, fn):
    start = time.perf_counter()
    result = fn()
    timings[name] = time.perf_counter() - start
    print(f"[demo] {name}: {timings[name]:.0f} s", flush=True)
    return result


def _fit_batch_to_data(tokenizer_cfg, n_images: int, name: str) -> None:
    """A tiny ``--n-train`` (a smoke run) holds fewer training images than the recipe's batch: the batch
    shrinks to fit, and the run says so."""
    from unigen.data.sampler import holdout_size

    n_train = n_images - holdout_size(tokenizer_cfg.val_size, n_images)
    if tokenizer_cfg.batch_size > n_train:
        print(f"[demo] {name} batch size {tokenizer_cfg.batch_size} -> {n_train}: --n-train {n_images} leaves "
              f"{n_train} training images", flush=True)
        tokenizer_cfg.batch_size = n_train


def demo_tokenizers(cfg: DemoConfig, steps, images: Path):
    """The run's ``tokenizers:`` with the demo's flags: the recipe's steps (the Shapes tokenizers for a recipe
    without any), ``--vq-steps`` / ``--siglip-steps`` long with one evaluation and checkpoint at the end, none
    for a tokenizer ``--vq-from`` / ``--siglip-from`` reuses."""
    from unigen.training.recipe import TokenizerSteps

    steps = steps or TokenizerSteps(**SHAPES_TOKENIZERS)
    once = {"vq": {"steps": cfg.vq_steps, "ae_warmup_steps": cfg.vq_warmup_steps, "eval_every": cfg.vq_steps,
                   "save_every": cfg.vq_steps},
            "siglip": {"steps": cfg.siglip_steps, "eval_every": cfg.siglip_steps, "save_every": cfg.siglip_steps}}
    reused = {"vq": cfg.vq_from, "siglip": cfg.siglip_from}
    return replace(steps, images=str(images), **{
        name: None if reused[name] else {**(getattr(steps, name) or SHAPES_TOKENIZERS[name]), **once[name]}
        for name in once})


def demo_plan(cfg: DemoConfig, recipe, images: Path):
    """The demo's whole run (unigen.training.run_plan) in ``OUTPUT_DIR/model``: the recipe with the demo's
    tokenizer steps, which train on ``images`` in the recipe's model shape."""
    from unigen.training.run_plan import make_plan

    reused = {f"{name}_from": path for name, path in (("vq", cfg.vq_from), ("siglip", cfg.siglip_from)) if path}
    recipe = replace(recipe, output_dir=str(Path(cfg.out_dir) / "model"), data=recipe.data or str(images),
                                 tokenizers=demo_tokenizers(cfg, recipe.tokenizers, images), **reused)
    whole = make_plan(recipe)
    for name, tokenizer_cfg in whole.tokenizers.items():
        _fit_batch_to_data(tokenizer_cfg, cfg.n_train, {"vq": "VQ", "siglip": "SigLIP"}[name])
    return whole


def tokenizer_configs(cfg: DemoConfig, recipe, manifest: Path):
    """The VQ and SigLIP trainer configs the demo trains (``None`` for one it reuses), in the shape of the
    recipe's ``model.vq`` / ``model.vision``, so the model loads them as trained."""
    whole = demo_plan(cfg, recipe, manifest)
    return whole.tokenizers.get("vq"), whole.tokenizers.get("siglip")


def run_demo(cfg: DemoConfig) -> Path:
    from unigen.generation.pipeline import UniGenPipeline
    from unigen.runs import write_json, write_text
    from unigen.shapes.data import write_dataset
    from unigen.shapes.evaluate import evaluate_captions, evaluate_edits, evaluate_generation
    from unigen.shapes.metrics import format_table
    from unigen.shapes.report import write_report
    from unigen.training import load_recipe
    from unigen.training.run_plan import plan_steps, run_steps, start

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    timings: dict[str, float] = {}
    manifest = _timed(timings, "data", lambda: write_dataset(out / "data", cfg.n_train, seed=cfg.seed + 1,
                                                                   style=cfg.render_style))
    training_manifest = manifest
    if "edit" in cfg.tasks:  # the edit triples join the caption lines in one manifest (same folder)
        from unigen.shapes.editing import write_edit_dataset

        # independent targets: at the demo's budget they scored higher than minimal edits (docs/EXPERIMENTS.md)
        edits = _timed(timings, "edit data", lambda: write_edit_dataset(out / "data", cfg.n_train, seed=cfg.seed + 2,
                                                                        minimal=False))
        training_manifest = manifest.with_name("train-edit.jsonl")
        write_text(training_manifest, manifest.read_text() + edits.read_text())
    steps = [f"stage{i + 1}.steps={n}" for i, n in enumerate(cfg.stage_steps or ())]
    recipe = load_recipe(cfg.recipe, [f"data={training_manifest}", f"seed={cfg.seed}", "overwrite=true", *steps,
                                      *cfg.overrides])
    # planned before any training, so a bad recipe fails at once; the tokenizers train on the caption lines
    whole = demo_plan(cfg, recipe, manifest)
    run = start(whole, plan_steps(whole, [(1, None), (2, None), (3, None)]), resume=None)
    final = run_steps(run, timed=lambda label, fn: _timed(timings, label, fn))[-1]
    pipe = UniGenPipeline.from_pretrained(final)
    scores, cap_items, gen_items, edit_items = {}, [], [], []
    if "caption" in cfg.tasks:
        scores["captioning"], cap_items = _timed(timings, "caption eval",
                                                 lambda: evaluate_captions(pipe, cfg.n_eval, cfg.seed, batch_size=50))
    if "generation" in cfg.tasks:
        scores["generation"], gen_items = _timed(timings, "generation eval",
                                                 lambda: evaluate_generation(pipe, cfg.n_eval, cfg.seed, batch_size=50))
    if "edit" in cfg.tasks:
        scores["edit"], edit_items = _timed(timings, "edit eval",
                                            lambda: evaluate_edits(pipe, cfg.n_eval, cfg.seed, batch_size=50))
    from unigen.shapes.captions import parse_caption

    demo_images = pipe(DEMO_PROMPTS, generator=torch.Generator().manual_seed(cfg.seed)).images
    generations = [(parse_caption(p), img) for p, img in zip(DEMO_PROMPTS, demo_images, strict=True)]
    generations += [(parse_caption(p), img) for p, img in gen_items[:16]]
    captions = [(item["spec"], item["image"], item["caption"]) for item in cap_items[:24]]
    write_json(out / "scores.json", {"scores": scores, "guidance_scale": pipe.model.config.guidance_scale,
                                     "temperature": pipe.model.config.temperature, "timings_s": timings})
    page = write_report(out, scores, generations, captions, timings, edits=edit_items[:16])
    print(format_table(scores))
    print(f"[demo] total {sum(timings.values()):.0f} s; report: {page}")
    return page
