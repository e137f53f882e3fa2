"""Named training recipes: a preset plus ``key=value`` settings, kept in ``recipes.json``.

``python -m minlm train --recipe speedrun`` trains the recipe of the shipped ``llama-1m`` (the
CPU speedrun's record, ``bench/SPEEDRUN.md``), and ``bench/speedrun.py --recipe`` reads the
same file, so the README's command and the benchmark cannot drift apart. Settings given after
the recipe apply on top of it.
"""

from __future__ import annotations

import json
from pathlib import Path

from minlm.errors import ConfigError

RECIPES = Path(__file__).resolve().parent / "recipes.json"


def read_recipe(name: str, path: str | Path = RECIPES) -> tuple[str, list[str]]:
    """(preset, overrides) of a named recipe in a JSON file of ``{name: {"preset": ...,
    "overrides": ["key=value", ...]}}``."""
    try:
        recipes = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--recipes {path}: cannot read it as JSON ({e})") from None
    if name not in recipes:
        raise ConfigError(f"--recipe {name!r} is not in {path}; recipes there: "
                          f"{', '.join(recipes) or 'none'}")
    recipe = recipes[name]
    return recipe.get("preset", "llama-1m"), list(recipe.get("overrides", []))
