"""A whole run from one recipe: the visual tokenizers (the recipe's ``tokenizers:``), the VQ codes of the data,
then the three stages, each step in its own folder of ``OUTPUT_DIR``, later steps reading earlier ones' outputs:

    OUTPUT_DIR/run.json            what the run was started with; ``--resume latest`` refuses a changed recipe
    OUTPUT_DIR/vq, OUTPUT_DIR/siglip   the tokenizers (folders as ``unigen train-vq`` / ``train-siglip`` write)
    OUTPUT_DIR/codes/NAME.jsonl    the data with every caption line's VQ codes (``tokenizer.vq_codes``)
    OUTPUT_DIR/stage1..3           the stages (``unigen.training.loop.run_stage``), from vq + siglip, on the codes

Every step knows when it is complete, so ``--resume latest`` keeps finished steps as they are and the interrupted
one continues from its last checkpoint. ``--max-steps`` cuts every step, the tokenizers too: a tokenizer cut short
ends the call (what follows needs it whole). Under a launcher every step trains data-parallel, the tokenizers one
after the other; rank 0 writes the run's files. A recipe without ``tokenizers:`` is a run of the stages alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from unigen import runs
from unigen.config import UniGenConfig
from unigen.config_io import config_to_dict, load_config
from unigen.data.jsonl import read_json_lines, read_json_object
from unigen.data.shards import is_streamed
from unigen.errors import ArgumentError, ConfigError, OutputExistsError
from unigen.recipes import resolve
from unigen.training import checkpoints as ckpt
from unigen.training import parallel
from unigen.training.loop import run_stage
from unigen.training.recipe import TrainRecipe
from unigen.training.start import stage_dir
from unigen.training.tokenizer.side_by_side import train_side_by_side
from unigen.training.tokenizer.siglip_trainer import SigLIPTrainConfig, train_siglip
from unigen.training.tokenizer.vq_codes import add_vq_codes
from unigen.training.tokenizer.vq_trainer import VQTrainConfig, train_vq

log = logging.getLogger("unigen.training")

RUN_FILE = "run.json"
# name -> (trainer config, its model part in the recipe's model, what it is called, its training function)
TOKENIZERS = {"vq": (VQTrainConfig, "vq", "VQ tokenizer", train_vq),
              "siglip": (SigLIPTrainConfig, "vision", "SigLIP encoder", train_siglip)}
SET_BY_THE_RUN = ("data", "out_dir", "resume", "overwrite")  # a tokenizer step's keys the run fills in
# how a run is kept, not what it trains: they may change on --resume latest
BOOKKEEPING = {"recipe": ("output_dir", "overwrite", "save_every", "keep_last", "tensorboard"),
               "tokenizer": ("out_dir", "resume", "overwrite", "save_every", "keep_last", "log_every", "tensorboard")}
IMAGE_KEYS = ("image", "file_name", "target")  # a manifest line's file names (and "codes" when it is a file)


@dataclasses.dataclass
class RunPlan:
    """What a recipe with ``tokenizers:`` trains, where, and from what."""

    recipe: TrainRecipe  # the stages': vq_from, siglip_from and data name the run's own steps
    started_with: dict  # the recipe and tokenizer configs as given, kept in run.json
    tokenizers: dict[str, VQTrainConfig | SigLIPTrainConfig]  # name -> config, in training order
    codes: tuple[Path, Path] | None = None  # (the data's manifest, its copy with VQ codes)

    @property
    def out(self) -> Path:
        return Path(self.recipe.output_dir)


@dataclasses.dataclass
class Step:
    """One step of the run: ``run()`` trains it (returns its output), ``complete()`` says it needs no more."""

    name: str  # vq, siglip, vq+siglip, codes, stage1, ...
    label: str  # what progress lines and the demo's timings call it
    folders: tuple[Path, ...]
    run: Callable[[], object]
    complete: Callable[[], bool]


def is_whole_run(recipe: TrainRecipe) -> bool:
    return recipe.tokenizers is not None


def tokenizer_config(recipe: TrainRecipe, name: str, images: str):
    """Step ``name``'s trainer config: its recipe file (``config:``) <- its own keys <- the run's folder and
    images, in the shape of the model the stages build (so the stages load it as trained)."""
    cls, part, _, _ = TOKENIZERS[name]
    spec = dict(getattr(recipe.tokenizers, name))
    taken = sorted(set(spec) & set(SET_BY_THE_RUN))
    if taken:
        raise ConfigError(f"tokenizers.{name}.{taken[0]}: the run sets it (images: tokenizers.images or data; "
                          f"folder: OUTPUT_DIR/{name}; --resume; the recipe's overwrite); drop it")
    if not images:
        raise ConfigError(f"tokenizers.{name}: no images to train on; set data=PATH or tokenizers.images=PATH")
    if not Path(images).expanduser().exists():  # named now, not after the other tokenizer's minutes
        raise ConfigError(f"tokenizers.{name}: its images {images} do not exist; set tokenizers.images=PATH (a JSONL "
                          "manifest or a folder of images; default: data)")
    path = spec.pop("config", None)
    shape = config_to_dict(getattr(UniGenConfig.from_dict(recipe.model), part))
    values = {**spec, part: shape, "data": images, "out_dir": str(Path(recipe.output_dir) / name),
              "overwrite": recipe.overwrite}
    return load_config(cls, resolve(path) if path else None, (), **values)


def check_sources(recipe: TrainRecipe) -> None:
    """One source for each part of the first stage's model."""
    names = recipe.tokenizers.names
    if names and recipe.init_from:
        raise ConfigError(f"init_from={recipe.init_from} starts from a checkpoint with its own tokenizers, but "
                          f"tokenizers.{names[0]} trains one; drop one of them (tokenizers.{names[0]}=null)")
    for name in names:
        given = getattr(recipe, f"{name}_from")
        if given:
            raise ConfigError(f"{name}_from={given} and tokenizers.{name} both give the run its {TOKENIZERS[name][2]}; "
                              f"drop one of them (tokenizers.{name}=null keeps {name}_from)")


def manifest_file(data: str) -> Path | None:
    """The JSONL file whose lines the codes step copies (``None``: streamed shards, coded as they are read)."""
    if is_streamed(data):
        return None
    path = Path(data).expanduser()
    return path / "metadata.jsonl" if path.is_dir() else path


def make_plan(recipe: TrainRecipe) -> RunPlan:
    """The run a recipe with ``tokenizers:`` asks for, checked before anything trains."""
    check_sources(recipe)
    steps, out = recipe.tokenizers, Path(recipe.output_dir)
    configs = {name: tokenizer_config(recipe, name, steps.images or recipe.data) for name in steps.names}
    if not recipe.data:
        raise ConfigError("data is empty: set data=PATH (a JSONL manifest or an imagefolder with metadata.jsonl)")
    started_with = {"recipe": config_to_dict(recipe), **{n: config_to_dict(c) for n, c in configs.items()}}
    points = {f"{name}_from": str(out / name) for name in configs}
    vq = points.get("vq_from", recipe.vq_from)
    source = manifest_file(recipe.data) if steps.codes and vq else None
    codes = None if source is None else (source, out / "codes" / source.name)
    if codes is not None:
        points["data"] = str(codes[1])
    return RunPlan(dataclasses.replace(recipe, **points), started_with, configs, codes)


# ---- run.json: what a run was started with ----
def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def _what_trains(started_with: dict) -> dict:
    """``started_with`` flat (``stage2.lr``, ``tokenizers.vq.lr``), without how the run is kept: the tokenizer
    steps as their trainers were configured, whether from the recipe or the files it names."""
    plain = json.loads(json.dumps(started_with))  # tuples as lists, as run.json reads back
    recipe = {k: v for k, v in plain.pop("recipe").items() if k not in BOOKKEEPING["recipe"]}
    section = {k: v for k, v in (recipe.pop("tokenizers") or {}).items() if k in ("images", "codes")}
    trainers = {name: {k: v for k, v in cfg.items() if k not in BOOKKEEPING["tokenizer"]}
                for name, cfg in plain.items()}
    return _flat({**recipe, "tokenizers": {**section, **trainers}})


def check_same_recipe(plan: RunPlan) -> None:
    """``--resume latest`` continues the run that was started, or refuses in one line naming what changed."""
    path = plan.out / RUN_FILE
    if not path.is_file():
        return
    then, now = _what_trains(read_json_object(path)), _what_trains(plan.started_with)
    changed = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k))
    if changed:
        key = changed[0]
        raise ConfigError(f"--resume latest: {plan.out} was started with another recipe ({key}: {then.get(key)!r} "
                          f"then, {now.get(key)!r} now); resume with the recipe and overrides it started with, or "
                          "start again (overwrite=true, or another --output-dir)")


# ---- the steps ----
def tokenizer_complete(folder: Path) -> bool:
    """The trainer writes its final weights, then train_config.json (each file atomically)."""
    return (folder / "model.safetensors").is_file() and (folder / "train_config.json").is_file()


def _train_tokenizer(cfg, name: str, max_steps: int | None) -> Path:
    return TOKENIZERS[name][3](cfg, max_steps=max_steps)


def _train_side_by_side(plan: RunPlan, max_steps: int | None) -> Path:
    seconds = train_side_by_side(plan.tokenizers["vq"], plan.tokenizers["siglip"], torch.get_num_threads(),
                                 max_steps)
    log.info("the SigLIP encoder was done after %.0f s", seconds)
    return plan.out


def side_by_side(plan: RunPlan, names: list[str]) -> bool:
    """Both tokenizers train, on the CPU, with threads to share: in two processes at once (side_by_side.py). Not
    under a launcher: there each trains on all its processes, one after the other."""
    return (plan.recipe.tokenizers.side_by_side and names == ["vq", "siglip"] and torch.get_num_threads() >= 2
            and not parallel.launched()
            and all(runs.resolve_device(c.device, ("cuda",)).type == "cpu" for c in plan.tokenizers.values()))


def tokenizer_steps(plan: RunPlan, resume: str | None, max_steps: int | None = None) -> list[Step]:
    for cfg in plan.tokenizers.values():
        cfg.resume = resume  # "latest": each trainer continues its newest checkpoint, if any
    names = list(plan.tokenizers)
    if side_by_side(plan, names) and not (resume and any(tokenizer_complete(plan.out / n) for n in names)):
        folders = tuple(plan.out / n for n in names)
        return [Step("vq+siglip", "VQ tokenizer + SigLIP encoder, side by side", folders,
                     lambda: _train_side_by_side(plan, max_steps), lambda: all(map(tokenizer_complete, folders)))]
    return [Step(name, TOKENIZERS[name][2], (plan.out / name,),
                 lambda name=name: _train_tokenizer(plan.tokenizers[name], name, max_steps),
                 lambda name=name: tokenizer_complete(plan.out / name)) for name in names]


def write_codes(source: Path, vq_dir: Path, out: Path) -> Path:
    """``source`` with every caption line's VQ codes, as ``out`` in the run's folder: its file names made
    absolute (``add_vq_codes`` writes beside the manifest it reads, so the copy it reads is in ``out``'s folder).
    Rank 0 writes it; the other processes wait for it."""
    if parallel.process_group_size()[0] == 0:
        _write_codes(source, vq_dir, out)
    parallel.barrier()
    return out


def _write_codes(source: Path, vq_dir: Path, out: Path) -> None:
    lines = []
    for _, record in read_json_lines(source):
        for key in (*IMAGE_KEYS, "codes"):
            if isinstance(record, dict) and isinstance(record.get(key), str):
                record[key] = str((source.parent / Path(record[key]).expanduser()).absolute())
        lines.append(json.dumps(record) + "\n")
    listing = out.with_name(f".{out.stem}.paths.jsonl")
    runs.write_text(listing, "".join(lines))
    add_vq_codes(listing, vq_dir, out)
    listing.unlink()


def codes_step(plan: RunPlan) -> Step:
    source, out = plan.codes
    return Step("codes", "VQ codes", (out.parent,), lambda: write_codes(source, Path(plan.recipe.vq_from), out),
                out.is_file)


def stage_step(plan: RunPlan, stage: int, resume: str | None, max_steps: int | None, init_from=None) -> Step:
    final = stage_dir(plan.recipe, stage) / "final"
    return Step(f"stage{stage}", f"stage {stage}", (stage_dir(plan.recipe, stage),),
                lambda: run_stage(plan.recipe, stage, init_from=init_from, resume=resume, max_steps=max_steps),
                lambda: ckpt.is_complete(final))


def plan_steps(plan: RunPlan, stages: list[tuple[int, str | None]], max_steps: int | None = None,
               init_from: str | None = None) -> list[Step]:
    """The steps of this call in order: the tokenizers and the codes with a run that starts at stage 1 (a fresh
    one, or ``--resume latest``), then ``stages`` ((stage, resume) each, as ``unigen train`` plans them)."""
    resume = stages[0][1]
    before = []
    if init_from and plan.tokenizers and stages[0][0] == 1:
        raise ArgumentError(f"--init-from {init_from} starts stage 1 from a checkpoint with its own tokenizers, but "
                            f"this recipe trains them (tokenizers.{next(iter(plan.tokenizers))}); drop one of them")
    if stages[0][0] == 1 and resume in (None, runs.LATEST):
        before = tokenizer_steps(plan, resume, max_steps) + ([codes_step(plan)] if plan.codes else [])
    else:
        needed = tokenizer_steps(plan, runs.LATEST) + ([codes_step(plan)] if plan.codes else [])
        missing = [s for s in needed if not s.complete()]
        if missing:
            raise ArgumentError(f"{missing[0].folders[0]} is not complete: this run's tokenizer steps come before "
                                "stage 1; run from stage 1 (with --resume latest to keep what is done)")
    return before + [stage_step(plan, s, r, max_steps, init_from if i == 0 else None)
                     for i, (s, r) in enumerate(stages)]


def keep_complete(steps: list[Step]) -> list[Step]:
    """``--resume latest``: the steps still to run; the complete ones are kept as they are."""
    done = [s for s in steps if s.complete()]
    for step in done:
        log.info("%s already complete (%s); --resume latest keeps it", step.label, step.folders[0])
    return [s for s in steps if s not in done]


def clear_earlier_run(plan: RunPlan, steps: list[Step], rank: int = 0) -> None:
    """A fresh run: an earlier run's output in a step's folder is refused (by every process), or deleted under
    overwrite=true by rank 0 (so a later ``--resume latest`` never takes an earlier run's step for this run's)."""
    for folder in (f for s in steps for f in s.folders if f.exists() and any(f.iterdir())):
        if not plan.recipe.overwrite:
            raise OutputExistsError(f"{folder} holds an earlier run's output: pass --resume latest to continue "
                                    "that run (complete steps are kept), overwrite=true to train it again, or "
                                    "another --output-dir")
        if rank == 0:
            log.warning("overwrite=true: deleting the earlier run's %s", folder)
            shutil.rmtree(folder, ignore_errors=True)


def start(plan: RunPlan, steps: list[Step], resume: str | None) -> list[Step]:
    """Checks and the run file, before anything trains; returns the steps left to run."""
    runs.setup_logging()
    starts_the_run = any(not s.name.startswith("stage") for s in steps)  # not a later stage alone
    latest = runs.normalize_resume(resume) == runs.LATEST
    if latest:
        check_same_recipe(plan)
        steps = keep_complete(steps)
    if parallel.launched():
        check_launch(plan, steps)
        parallel.start_processes(plan.recipe.device, bf16=False)  # the process group the steps below share
    rank = parallel.process_group_size()[0]
    if resume is None:
        clear_earlier_run(plan, steps, rank)
    if rank == 0 and starts_the_run and (resume is None or not (plan.out / RUN_FILE).is_file()):
        runs.write_json(plan.out / RUN_FILE, plan.started_with)
    parallel.barrier()
    return steps


def check_launch(plan: RunPlan, steps: list[Step]) -> None:
    """What a launched run cannot train, named before anything is written."""
    vq = plan.tokenizers.get("vq")
    if vq is not None and vq.disc_weight > 0 and any(s.name == "vq" for s in steps):
        raise ConfigError(f"tokenizers.vq.disc_weight={vq.disc_weight}: the PatchGAN discriminator trains in one "
                          "process (its BatchNorm would normalise each process's share of the batch); run this "
                          "recipe without a launcher until its VQ step is done, then --resume latest under it")


def run_steps(steps: list[Step], timed: Callable[[str, Callable[[], object]], object] | None = None) -> list:
    """Run ``steps`` in order; ``timed(label, fn)`` may wrap each (the demo times them)."""
    outputs = []
    for step in steps:
        t0 = time.perf_counter()
        outputs.append(timed(step.label, step.run) if timed else step.run())
        log.info("%s done in %.0f s: %s", step.label, time.perf_counter() - t0, step.folders[0])
        if not step.name.startswith("stage") and not step.complete():
            log.warning("%s stopped at --max-steps before its end; --resume latest continues it, then the steps "
                        "after it (they need it whole)", step.label)
            break
    return outputs
