"""What a `.d3` file is worth: accuracy of networks trained only on it, beside storage and compute,
and the honest equal-bytes baselines (random real images as uint8, PNG, JPEG, WebP).
"""
from d3codec.evaluate.baselines import CODECS, BaselineSet, select_baseline
from d3codec.evaluate.recipe import MODELS, Recipe
from d3codec.evaluate.report import render, storage_figures, to_json
from d3codec.evaluate.run import evaluate_baseline, evaluate_file

__all__ = ["evaluate_file", "evaluate_baseline", "select_baseline", "BaselineSet", "Recipe", "CODECS", "MODELS",
           "render", "to_json", "storage_figures"]
