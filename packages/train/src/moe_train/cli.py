"""`moe-train`: train, evaluate, prime, fine-tune, generate and export MoE language models.

Every user mistake (unknown preset, option or override; an option out of range; missing or
corrupt data; unreadable or incompatible checkpoint; a file system error; absent device or too
little memory) ends as one `error: ...` line on stderr and exit code 2: commands raise CLIError
(or moe_data.DataError) where they read and check their input. Any other exception is a bug: its
traceback is printed and the exit code is 1, except a failure of torch.compile (`--compile`),
which is one line and exit code 2. Set MOE_TRAIN_DEBUG=1 to get the traceback of a user
error too.

Each subcommand is a module of `moe_train.commands` with `NAME`, `HELP`, `add_arguments(parser)`
and `run(args) -> exit code`; `COMMANDS` lists them in the order `--help` shows. A module with
`PASSTHROUGH = True` gets its arguments unparsed, as `args.argv` (lm-eval's own command line).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import moe_train
from moe_train.commands import (
    compare,
    evaluate,
    export,
    finetune,
    generate,
    info,
    lm_eval,
    prime,
    train,
)
from moe_train.errors import CLIError

EXIT_USAGE = 2
EXIT_BUG = 1
COMMANDS = (train, evaluate, prime, finetune, generate, export, lm_eval, compare, info)


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line, like every other error here."""

    def error(self, message: str):
        raise CLIError(message)


def build_parser() -> tuple[Parser, dict[str, Parser]]:
    """The top-level parser (for --help) and one parser per subcommand."""
    parser = Parser(prog="moe-train", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP, **getattr(command, "PARSER", {}))
        command.add_arguments(p)
    return parser, dict(sub.choices)


def main(argv: list[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        top, parsers = build_parser()
        if not argv:
            top.print_help()
            return 0
        if argv == ["--version"]:
            print(f"moe-train {moe_train.__version__}")
            return 0
        if argv[0] not in parsers:
            top.parse_args(argv)
            raise CLIError(f"unknown command {argv[0]!r}; expected one of {', '.join(parsers)}")
        command = {command.NAME: command for command in COMMANDS}[argv[0]]
        if getattr(command, "PASSTHROUGH", False):
            args = argparse.Namespace(argv=argv[1:])
        else:
            # intermixed: KEY=VALUE overrides may come before, between or after the flags
            args = parsers[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        run = command.run
        return run(args)
    except _user_errors() as e:
        if os.environ.get("MOE_TRAIN_DEBUG"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("MOE_TRAIN_DEBUG"):
            raise
        if _from_torch_compile(e):
            # --compile on a machine torch.compile cannot build for (no C compiler, a broken
            # cache, an unsupported op): the run works without it
            print(
                f"error: torch.compile failed: {_root_cause(e)} (run without --compile)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        # anything else is a bug in moe-train or a library under it: the traceback is the report
        traceback.print_exc()
        print("error: internal error (a bug); the traceback above says where", file=sys.stderr)
        return EXIT_BUG


def _user_errors() -> tuple[type[BaseException], ...]:
    """The error types of what the user can fix: config, data, checkpoint, file system, memory.
    moe_data's and torch's are named only when the command imported them (an error of a module
    never imported was not raised), so that `--help` imports neither."""
    errors: list[type[BaseException]] = [CLIError, OSError]
    if (data_errors := sys.modules.get("moe_data.errors")) is not None:
        errors.append(data_errors.DataError)
    if (torch := sys.modules.get("torch")) is not None:
        errors.append(torch.cuda.OutOfMemoryError)
    return tuple(errors)


def _from_torch_compile(e: BaseException) -> bool:
    """Whether the error comes from torch.compile (dynamo or inductor), by the module of its
    type: importing those modules to name their exceptions would slow every command's start."""
    return type(e).__module__.startswith(("torch._dynamo", "torch._inductor"))


def _root_cause(e: BaseException) -> str:
    """`Type: first line` of the innermost cause: dynamo wraps a backend's error in its own
    (`inner_exception`), and errors raise others `from` them."""
    while (inner := getattr(e, "inner_exception", None) or e.__cause__) is not None:
        e = inner
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
