"""Run plumbing (unigen.runs) and the shared sampling options: one vocabulary, one place for each idea."""

import ast
import json
import random
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from unigen import runs
from unigen.config import UniGenConfig
from unigen.errors import CheckpointError, ConfigError, OutputExistsError
from unigen.generation.sampling_options import SamplingOptions

REPO = Path(__file__).resolve().parents[1]


def draws():
    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist()


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    draws()
    torch.save(runs.rng_state(), tmp_path / "rng.pt")
    expected = draws()
    runs.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


def test_state_files_that_need_code_are_refused_not_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Payload()}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="state.pt holds more than tensors"):
        runs.load_state_file(tmp_path / "state.pt")
    assert not marker.exists()


def test_one_resume_vocabulary(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    assert runs.resolve_resume("latest", root, overwrite=False, marker="m") is None
    assert "nothing to resume" in caplog.text
    for step in (3, 10):
        (root / runs.step_dir_name(step)).mkdir(parents=True)
        (root / runs.step_dir_name(step) / "m").touch()
    (root / ".tmp-step_0000011").mkdir()  # what a killed run was writing: never a checkpoint
    newest = root / "step_0000010"
    assert runs.resolve_resume("latest", root, overwrite=False, marker="m") == newest
    assert runs.resolve_resume("auto", root, overwrite=False, marker="m") == newest  # the trainers' old word
    assert runs.resolve_resume(str(root / "step_0000003"), root, overwrite=False, marker="m") == root / "step_0000003"
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        runs.resolve_resume(str(tmp_path), root, overwrite=False, marker="m")
    with pytest.raises(OutputExistsError, match="pass --resume latest to continue it, overwrite=true to start over"):
        runs.resolve_resume(None, root, overwrite=False, marker="m")
    assert runs.resolve_resume(None, root, overwrite=True, marker="m") is None and not root.exists()


def test_metrics_log_drops_a_torn_last_line_and_names_a_bad_one_elsewhere(tmp_path, caplog):
    log = runs.MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.write(step, "train", {"loss": 1.0 / step})
    with log.path.open("a") as f:
        f.write('{"step": 4, "kind": "tr')
    log.truncate_after(2)
    assert [r["step"] for r in runs.read_jsonl_rows(log.path)] == [1, 2]
    assert "torn last line" in caplog.text
    log.path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl:2 is not a JSON object"):
        log.truncate_after(5)


def test_train_package_takes_no_generic_helper_from_the_tokenizer_trainers():
    allowed = {"load_vq_into", "load_siglip_into"}  # the trained tokenizers themselves, not helpers
    for path in sorted((REPO / "unigen" / "train").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("unigen.training.tokenizer"):
                assert {a.name for a in node.names} <= allowed, (path.name, node.module)


def test_sampling_options_take_the_checkpoints_defaults_in_one_place():
    config = UniGenConfig(guidance_scale=1.5, temperature=0.4)
    assert SamplingOptions().with_defaults(config) == SamplingOptions(guidance_scale=1.5, temperature=0.4)
    assert SamplingOptions(guidance_scale=3.0, temperature=0.0).with_defaults(config) == SamplingOptions(3.0, 0.0)
    assert SamplingOptions().for_text().temperature == 0.0
    parser = runpy.run_path(str(REPO / "sample" / "generate.py"))["build_parser"]()
    args = parser.parse_args(["a cat", "--model", "m"])
    assert args.guidance_scale is None and args.temperature is None  # the checkpoint decides, not the script


def test_recipes_and_configs_are_built_by_one_builder():
    from unigen.config_io import build_config
    from unigen.training.recipe import StageConfig

    assert build_config(StageConfig, {"lr": "1e-3", "mixture": [1, 0, 3]}).mixture == (1.0, 0.0, 3.0)
    with pytest.raises(ConfigError, match=r"config.lr must be a finite number, got nan"):
        build_config(StageConfig, {"lr": "nan"})
    with pytest.raises(ConfigError, match=r"config.steps needs a value"):
        build_config(StageConfig, {"steps": None})
    raw = UniGenConfig().to_dict()
    assert UniGenConfig.from_dict(json.loads(json.dumps(raw))) == UniGenConfig()
