"""Training: one loop (``engine.run_loop``) for every task: the unified model's stages (``loop.run_stage``,
``stage.StageTask``, ``recipe.TrainRecipe``) and the visual tokenizers (``tokenizer/``)."""

from unigen.training.loop import run_stage
from unigen.training.recipe import StageConfig, TrainRecipe, load_recipe

__all__ = ["StageConfig", "TrainRecipe", "load_recipe", "run_stage"]
