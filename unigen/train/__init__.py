"""The three-stage trainer (Janus recipe): see ``loop.run_stage`` and ``recipe.TrainRecipe``."""

from unigen.train.loop import run_stage
from unigen.train.recipe import StageConfig, TrainRecipe, load_recipe

__all__ = ["StageConfig", "TrainRecipe", "load_recipe", "run_stage"]
