"""moe_train: the `moe-train` command line (train, eval, prime, finetune, generate, export,
lm-eval, info) and what it is built from."""

import importlib.metadata

__version__ = importlib.metadata.version("moe-train")
