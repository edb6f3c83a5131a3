"""`moe-train lm-eval ARGS...`: lm-evaluation-harness's command line with the `moe` model.

Everything after `lm-eval` goes to lm-eval's CLI unchanged (`moe-train lm-eval --help` shows its
help); `moe_train.lm_eval_adapter` is imported first, so `--model moe --model_args path=RUN`
evaluates a run or an export. Needs the `moe-train[eval]` extra.
"""

from __future__ import annotations

import sys

from moe_train.errors import CLIError

NAME = "lm-eval"
HELP = "run lm-evaluation-harness on a run or an export (--model moe --model_args path=RUN)"
# the arguments are lm-eval's: cli.main hands them over unparsed, as args.argv
PASSTHROUGH = True


def add_arguments(p) -> None:
    p.add_argument("argv", nargs="*", help="lm-eval's arguments, e.g. --model moe --tasks ...")


def run(args) -> int:
    try:
        import lm_eval.__main__

        import moe_train.lm_eval_adapter  # noqa: F401  (registers the `moe` model)
    except ImportError as e:
        raise CLIError(
            f"moe-train lm-eval needs lm-evaluation-harness ({e.name} cannot be imported): "
            "pip install 'moe-train[eval]'"
        ) from None
    saved = sys.argv
    sys.argv = ["lm-eval", *args.argv]
    try:
        lm_eval.__main__.cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0
