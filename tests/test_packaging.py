"""A wheel install (not editable) carries everything the CLI reads: the recipes and the shipped checkpoint ship as
package data under unigen/_data/, and the commands run from a folder that is not the source tree."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# the train extra's packages (pyproject.toml) and the one that left the core install: running a model needs none
TRAINING_ONLY = ("accelerate", "peft", "tensorboard", "diffusers")


def _source_files() -> list[str]:
    """What a clean clone holds (tracked and new, not ignored files), so the build sees no stray build/ folder."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    return [f for f in out.splitlines() if (REPO / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The project built as a wheel and installed with `pip install --target` (no dependencies, no network)."""
    root = tmp_path_factory.mktemp("wheel")
    src, target = root / "src", root / "site"
    for name in _source_files():  # a copy: building in place would leave build/ and *.egg-info in the checkout
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, capture_output=True, text=True)
    return target


def _run(target: Path, cwd: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_holds_every_module_and_the_recipes_as_data_only(wheel):
    ours = {p.relative_to(REPO).as_posix() for p in (REPO / "unigen").rglob("*.py")}
    installed = {p.relative_to(wheel).as_posix() for p in (wheel / "unigen").rglob("*.py")}
    assert ours <= installed, f"missing from the wheel (add the package to pyproject.toml): {sorted(ours - installed)}"
    data = wheel / "unigen" / "_data"
    shipped = [f"train/{p.name}" for p in (REPO / "train").glob("*.yaml")]
    shipped += [f"tokenizers/{p.name}" for p in (REPO / "tokenizers").glob("*.yaml")]
    shipped += [p.relative_to(REPO).as_posix() for p in (REPO / "checkpoints").glob("*/*")]
    assert {f"checkpoints/{name}/model.safetensors" for name in ("shapes-small", "shapes-small-b")} <= set(shipped)
    assert "train/shapes.yaml" in shipped and "tokenizers/vq-shapes.yaml" in shipped
    for name in shipped:
        assert (data / name).read_bytes() == (REPO / name).read_bytes(), name
    # data, not code: nothing importable named tokenizers (it would shadow Hugging Face's), at the top or below
    assert not list(data.rglob("__init__.py")) and not list(REPO.glob("tokenizers/__init__.py"))
    assert sorted(p.name for p in wheel.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "unigen"]


def test_the_installed_package_finds_its_recipes_and_runs_the_shipped_checkpoint_from_any_folder(wheel, tmp_path):
    # one process (imports take seconds): where things were found, then `unigen eval shapes` and `unigen generate`
    # on the shipped model, with the training-only packages made unimportable (a core install has none of them)
    more = [["generate", "a red circle", "--num-images", "3", "--output-dir", "gen"],
            ["caption", "gen/image_000.png"], ["edit", "gen/image_000.png", "make it blue", "--output-dir", "edit"]]
    more = [[*args, "--model", "checkpoints/shapes-small", "--device", "cpu"] for args in more]
    code = (f"import sys; sys.modules.update(dict.fromkeys({TRAINING_ONLY!r})); "
            "import tokenizers, unigen.recipes as r; "
            "print(r.__file__, r.recipe_path('train/shapes.yaml'), tokenizers.__file__, sep='\\n'); "
            f"from unigen.cli import main; sys.exit(main(sys.argv[1:]) or any(main(a) for a in {more!r}))")
    done = _run(wheel, tmp_path, "-c", code, "eval", "shapes", "--model", "checkpoints/shapes-small", "--n", "4",
                "--batch-size", "4", "--device", "cpu", "--json", "scores.json", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    module, recipe, hf_tokenizers = done.stdout.splitlines()[:3]
    assert Path(module).is_relative_to(wheel) and Path(recipe).is_relative_to(wheel / "unigen" / "_data")
    # Hugging Face's package (a recipe folder imported as a namespace package would have no __file__)
    assert hf_tokenizers.endswith("__init__.py") and not Path(hf_tokenizers).is_relative_to(REPO / "tokenizers")
    assert not Path(hf_tokenizers).is_relative_to(wheel)
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["captioning"]["n"] == 4 and scores["generation"]["n"] == 4
    # three images in a 2 x 2 grid, row by row, the empty cell black
    images = [np.asarray(Image.open(tmp_path / "gen" / f"image_{i:03d}.png").convert("RGB")) for i in range(3)]
    sheet = np.asarray(Image.open(tmp_path / "gen" / "grid.png").convert("RGB"))
    h, w, _ = images[0].shape
    assert sheet.shape == (2 * h, 2 * w, 3)
    cells = [sheet[:h, :w], sheet[:h, w:], sheet[h:, :w], sheet[h:, w:]]
    for cell, image in zip(cells, images):
        np.testing.assert_array_equal(cell, image)
    assert not cells[3].any()
    assert (tmp_path / "edit" / "000-image_000.png").is_file()
    assert re.search(r"^gen/image_000\.png\t.*\bred\b", done.stdout, re.M), done.stdout  # the caption of a red shape


def test_inference_never_imports_the_training_packages():
    # `import unigen`, the pipeline and every command's parser (the CLI builds them all) pull no training package:
    # the core install (no train extra) must run them
    code = ("import sys, unigen; from unigen.generation.pipeline import UniGenPipeline; import unigen.app; "
            "from unigen.cli import main\n"
            "try:\n    main(['generate', '--help'])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {TRAINING_ONLY!r} or 'tensorboard' in m))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--no-grid" in done.stdout  # the help ran
    assert done.stdout.splitlines()[-1] == "[]"


@pytest.mark.slow  # a venv without the train extra (~15 s)
def test_a_training_command_without_the_train_extra_names_the_install(tmp_path):
    # a core install: peft and the rest of the train extra are not there; `unigen merge` needs peft
    code = (f"import sys; sys.modules.update(dict.fromkeys({TRAINING_ONLY!r})); from unigen.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, "merge", "checkpoints/shapes-small", str(tmp_path / "adapter"),
                           str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr == ("error: this command needs peft, from the train extra the core install leaves out: "
                           "pip install 'unigen[train]'\n")


@pytest.mark.slow
def test_the_wheel_installed_demo_runs_from_any_folder(wheel, tmp_path):
    # the command: every stage a step or two, from a folder with no recipes in it
    done = _run(wheel, tmp_path, "-m", "unigen.cli", "demo", "--n-train", "64", "--vq-steps", "3",
                "--vq-warmup-steps", "1", "--siglip-steps", "2", "--stage-steps", "1", "1", "1", "--n-eval", "4",
                timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "demo_out" / "index.html").is_file()
    assert (tmp_path / "demo_out" / "model" / "stage3" / "final" / "model.safetensors").is_file()
