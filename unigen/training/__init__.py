"""The three-stage trainer (Janus recipe): see ``loop.run_stage`` and ``recipe.TrainRecipe``."""

from unigen.training.loop import run_stage
from unigen.training.recipe import StageConfig, TrainRecipe, load_recipe

__all__ = ["StageConfig", "TrainRecipe", "load_recipe", "run_stage"]
