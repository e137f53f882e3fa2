"""Differential attention (Ye et al. 2024, "Differential Transformer"), as a minlm experiment.

Importing this package registers the token mixer ``diffattn`` and the preset ``diffattn-1m``
(llama-1m with differential attention). Load it with ``experiment=diffattn`` (command line,
``ModelConfig(..., experiment="diffattn")``, or ``ModelConfig.from_preset("diffattn-1m",
experiment="diffattn")``); run folders record it, so ``load_run`` reloads it.
"""

from minlm.presets import PRESETS

from .mixer import DiffAttention  # noqa: F401 - importing registers the mixer

PRESETS["diffattn-1m"] = dict(PRESETS["llama-1m"], mixer="diffattn", experiment="diffattn")
