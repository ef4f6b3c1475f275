"""The Shapes demo: data -> visual tokenizers -> three training stages -> samples, captions, scores.

Everything is trained from scratch on this machine; ``demo_out/index.html`` shows the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from unigen.recipes import recipe_path

DEMO_TASKS = ("caption", "generation", "edit")
DEMO_PROMPTS = ["a large red circle at the top left", "a small blue square at the center",
                "a large yellow triangle at the bottom", "a small green diamond at the right",
                "a large purple square at the bottom right", "a small white circle at the top",
                "a large cyan diamond at the left", "a small orange triangle at the bottom left"]


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
    n_eval: int = 200
    seed: int = 0
    threads: int = 2
    recipe: str = str(recipe_path("train/shapes.yaml"))
    vq_from: str | None = None  # a trained VQ tokenizer to reuse instead of training one
    siglip_from: str | None = None  # a trained SigLIP encoder to reuse instead of training one
    overrides: tuple[str, ...] = ()  # recipe key=value overrides
    # what the model is trained on and scored for: captions and generation come from the caption lines; "edit"
    # adds as many edit triples (unigen.shapes.editing), which train in the generation share of the mixture
    tasks: tuple[str, ...] = ("caption", "generation")

    def __post_init__(self):
        # checked here, before minutes of data and tokenizer work, and in the demo's own flag names
        from unigen.errors import ArgumentError

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


def tokenizer_configs(cfg: DemoConfig, recipe, manifest: Path):
    """The VQ and SigLIP trainer configs the demo trains (``None`` for one it reuses): tokenizers/*.yaml with the
    recipe's ``model.vq`` / ``model.vision`` over them, so the tokenizers have the shape the model loads."""
    from unigen.config_io import load_config
    from unigen.training.tokenizer.siglip_trainer import SigLIPTrainConfig
    from unigen.training.tokenizer.vq_trainer import VQTrainConfig

    out = Path(cfg.out_dir)
    vq_cfg = sig_cfg = None
    if cfg.vq_from is None:
        vq_cfg = load_config(VQTrainConfig, recipe_path("tokenizers/vq-shapes.yaml"),
                             [f"data={manifest}", "overwrite=true", f"out_dir={out / 'vq'}", f"steps={cfg.vq_steps}",
                              f"ae_warmup_steps={cfg.vq_warmup_steps}", f"eval_every={cfg.vq_steps}",
                              f"save_every={cfg.vq_steps}"], vq=recipe.model.get("vq", {}))
    if cfg.siglip_from is None:
        sig_cfg = load_config(SigLIPTrainConfig, recipe_path("tokenizers/siglip-shapes.yaml"),
                              [f"data={manifest}", "overwrite=true", f"out_dir={out / 'siglip'}",
                               f"steps={cfg.siglip_steps}", f"eval_every={cfg.siglip_steps}",
                               f"save_every={cfg.siglip_steps}"], vision=recipe.model.get("vision", {}))
    for name, tokenizer_cfg in (("VQ", vq_cfg), ("SigLIP", sig_cfg)):
        if tokenizer_cfg is not None:
            _fit_batch_to_data(tokenizer_cfg, cfg.n_train, name)
    return vq_cfg, sig_cfg


def run_demo(cfg: DemoConfig) -> Path:
    from unigen.generation.pipeline import UniGenPipeline
    from unigen.runs import resolve_device, write_json, write_text
    from unigen.shapes.data import write_dataset
    from unigen.shapes.evaluate import evaluate_captions, evaluate_edits, evaluate_generation
    from unigen.shapes.metrics import format_table
    from unigen.shapes.report import write_report
    from unigen.training import load_recipe, run_stage
    from unigen.training.tokenizer.side_by_side import train_side_by_side
    from unigen.training.tokenizer.siglip_trainer import train_siglip
    from unigen.training.tokenizer.vq_trainer import train_vq

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    timings: dict[str, float] = {}
    manifest = _timed(timings, "data", lambda: write_dataset(out / "data", cfg.n_train, seed=cfg.seed + 1))
    vq_dir, siglip_dir = cfg.vq_from or out / "vq", cfg.siglip_from or out / "siglip"
    coded_manifest = manifest.with_name("train-codes.jsonl")  # written by add_vq_codes below
    training_manifest = coded_manifest
    if "edit" in cfg.tasks:  # the edit triples join the caption lines in one manifest (same folder)
        from unigen.shapes.editing import write_edit_dataset

        # independent targets: at the demo's budget they scored higher than minimal edits (docs/EXPERIMENTS.md)
        edits = _timed(timings, "edit data", lambda: write_edit_dataset(out / "data", cfg.n_train, seed=cfg.seed + 2,
                                                                        minimal=False))
        training_manifest = manifest.with_name("train-codes-edit.jsonl")
    steps = [f"stage{i + 1}.steps={n}" for i, n in enumerate(cfg.stage_steps or ())]
    recipe = load_recipe(cfg.recipe, [f"data={training_manifest}", f"output_dir={out / 'model'}", f"vq_from={vq_dir}",
                                      f"siglip_from={siglip_dir}", f"seed={cfg.seed}", "overwrite=true", *steps,
                                      *cfg.overrides])
    # loaded before any training, so a bad recipe fails at once
    vq_cfg, sig_cfg = tokenizer_configs(cfg, recipe, manifest)
    side_by_side = (vq_cfg is not None and sig_cfg is not None and cfg.threads >= 2
                    and resolve_device(vq_cfg.device, ("cuda",)).type == "cpu"
                    and resolve_device(sig_cfg.device, ("cuda",)).type == "cpu")
    if side_by_side:
        # neither trainer fills two cores: the encoder trains in a second process (see side_by_side.py)
        seconds = _timed(timings, "VQ tokenizer + SigLIP encoder, side by side",
                         lambda: train_side_by_side(vq_cfg, sig_cfg, cfg.threads))
        print(f"[demo] (the SigLIP encoder was done after {seconds:.0f} s)", flush=True)
    else:
        if vq_cfg:
            _timed(timings, "VQ tokenizer", lambda: train_vq(vq_cfg))
        if sig_cfg:
            _timed(timings, "SigLIP encoder", lambda: train_siglip(sig_cfg))
    from unigen.training.tokenizer.vq_codes import add_vq_codes

    # the VQ is frozen from here on: encode every training image once instead of once per stage
    _timed(timings, "VQ codes", lambda: add_vq_codes(manifest, vq_dir, coded_manifest))
    if "edit" in cfg.tasks:
        write_text(training_manifest, coded_manifest.read_text() + edits.read_text())
    final = None
    for stage in (1, 2, 3):
        final = _timed(timings, f"stage {stage}", lambda stage=stage: run_stage(recipe, stage, resume=None))
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
