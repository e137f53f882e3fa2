"""minlm: a small-language-model lab.

Build a tokenizer, train a tiny model on real text, trace every tensor shape, generate,
fine-tune and compare runs. Notebooks and the CLI are thin layers over these functions.
"""

from minlm.config import ConfigError, ModelConfig, TrainConfig
from minlm.model import LM
from minlm.tracing import LoggingModule, Probe, trace

__version__ = "0.1.0"

__all__ = ["ConfigError", "ModelConfig", "TrainConfig", "LM", "LoggingModule", "Probe", "trace",
           "__version__"]
