"""The subcommands of `moe-train`, one module each (see moe_train.cli)."""
