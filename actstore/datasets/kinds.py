"""The dataset kinds (the paper's six schemas) and their target names: plain constants, so
that prompts and the CLIs can name them without loading pandas."""
from __future__ import annotations

__all__ = ["KINDS", "PLACE_TARGETS", "TIME_TARGETS"]

KINDS = ("world_place", "us_place", "nyc_place", "art", "historical_figure", "headline")
PLACE_TARGETS = ("latitude", "longitude")
TIME_TARGETS = ("year",)  # time targets are always called "year" (fractional for dates)
