"""Zero / few-shot multiple-choice priming tasks: a JSONL format, its loader and a prompt builder.

Format (UTF-8, one JSON object per line, blank lines ignored):

    {"name": "toy", "template": "Q: {context}\\nA:", "separator": "\\n\\n"}   <- optional header
    {"context": "Two plus two is", "choices": [" four", " five"], "label": 0}
    ...

The header, if present, is the first non-blank line, told apart by having none of "context",
"choices" and "label"; its
keys are `name` (default: the file name without .jsonl), `template` (must contain
"{context}"; default "{context}"), `separator` between demonstrations (default "\\n\\n") and
`description`. Each example has `context` (string), `choices` (at least two strings) and
`label` (index of the right choice); other keys are kept in `Example.extra` and ignored.
Choices are appended to the prompt verbatim, so they carry their own leading space.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import numpy as np

from moe_data.errors import DataError
from moe_data.sources import decode_utf8, existing_file, read_bytes

HEADER_KEYS = {"name", "template", "separator", "description"}
EXAMPLE_KEYS = {"context", "choices", "label"}


@dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    label: int
    extra: dict = field(default_factory=dict, compare=False)


@dataclass
class Task:
    name: str
    examples: list[Example]
    template: str = "{context}"
    separator: str = "\n\n"
    description: str = ""
    path: Path | None = None

    def render(self, example: Example) -> str:
        """The example's context in the template (plain replace: braces in contexts are safe)."""
        return self.template.replace("{context}", example.context)


def example_task_path() -> Path:
    """The shipped toy task: verse completion on held-out (test-split) verses of the default corpus."""
    return Path(str(files("moe_data") / "tasks" / "kjv_verse_completion.jsonl"))


def _fail(path, lineno, message) -> DataError:
    return DataError(f"{path}:{lineno}: {message}")


def _header(obj: dict, path, lineno) -> dict:
    unknown = set(obj) - HEADER_KEYS
    if unknown:
        raise _fail(
            path,
            lineno,
            f"header has unknown field(s) {sorted(unknown)}; allowed: {sorted(HEADER_KEYS)}",
        )
    for key in HEADER_KEYS & set(obj):
        if not isinstance(obj[key], str):
            raise _fail(
                path, lineno, f"field '{key}' must be a string, got {type(obj[key]).__name__}"
            )
    if "template" in obj and "{context}" not in obj["template"]:
        raise _fail(path, lineno, "field 'template' must contain {context}")
    return obj


def _example(obj: dict, path, lineno) -> Example:
    for key in ("context", "choices", "label"):
        if key not in obj:
            raise _fail(path, lineno, f"missing field '{key}'")
    context, choices, label = obj["context"], obj["choices"], obj["label"]
    if not isinstance(context, str):
        raise _fail(path, lineno, f"field 'context' must be a string, got {type(context).__name__}")
    if not isinstance(choices, list) or len(choices) < 2:
        raise _fail(path, lineno, "field 'choices' must be a list of at least two strings")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            raise _fail(
                path, lineno, f"field 'choices' item {i} must be a non-empty string, got {choice!r}"
            )
    if isinstance(label, bool) or not isinstance(label, int):
        raise _fail(path, lineno, f"field 'label' must be an integer, got {type(label).__name__}")
    if not 0 <= label < len(choices):
        raise _fail(
            path,
            lineno,
            f"field 'label' is {label}, outside [0, {len(choices)}) for its {len(choices)} choices",
        )
    extra = {k: v for k, v in obj.items() if k not in ("context", "choices", "label")}
    return Example(context, tuple(choices), label, extra)


def load_tasks(path) -> Task:
    """Read and validate a task file; errors name the file, the line and the field."""
    src = existing_file(path, "task file")
    lines = decode_utf8(read_bytes(src), src).split("\n")
    header, examples = {}, []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise _fail(src, lineno, f"not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise _fail(src, lineno, f"expected a JSON object, got {type(obj).__name__}")
        if not EXAMPLE_KEYS & set(obj):
            if header or examples:
                raise _fail(
                    src,
                    lineno,
                    "a header (no context, choices or label) may only be the first line",
                )
            header = _header(obj, src, lineno)
            continue
        examples.append(_example(obj, src, lineno))
    if not examples:
        raise DataError(f"{src} holds no examples")
    return Task(
        name=header.get("name", src.name.removesuffix(".jsonl")),
        examples=examples,
        template=header.get("template", "{context}"),
        separator=header.get("separator", "\n\n"),
        description=header.get("description", ""),
        path=src,
    )


def build_prompt(
    task: Task, example, k_shot: int, seed: int, *, train: Task | None = None
) -> tuple[str, list[str]]:
    """(prompt prefix, choices) for one example with `k_shot` demonstrations.

    Demonstrations are drawn without replacement from `train.examples` if given, else from the
    task's other examples (those not equal to this one), by a generator seeded with `seed` and
    the example's text, so a prompt depends only on (task, example, k_shot, seed). Each
    demonstration is its rendered context followed by its right choice; they are joined by the
    task's separator, and the example's rendered context ends the prefix. The scorer appends
    each choice to the prefix.
    """
    if isinstance(example, (int, np.integer)) and not isinstance(example, bool):
        if not 0 <= example < len(task.examples):
            raise ValueError(
                f"example index {example} is outside the task's {len(task.examples)} examples"
            )
        example = task.examples[example]
    if not isinstance(example, Example):
        raise ValueError(
            f"example must be an Example or an index into task.examples, not {type(example).__name__}"
        )
    if isinstance(k_shot, bool) or not isinstance(k_shot, (int, np.integer)) or k_shot < 0:
        raise ValueError(f"k_shot must be a non-negative integer, not {k_shot!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, not {seed!r}")
    pool = [e for e in (train or task).examples if e != example]
    if k_shot > len(pool):
        source = f"train task {train.name!r}" if train else f"task {task.name!r}"
        raise ValueError(
            f"k_shot={k_shot} needs that many other examples; {source} has {len(pool)}"
        )
    fingerprint = zlib.crc32(json.dumps([example.context, example.choices]).encode())
    rng = np.random.default_rng([int(seed), fingerprint])
    demos = [pool[i] for i in rng.choice(len(pool), size=k_shot, replace=False)] if k_shot else []
    shown = train or task
    parts = [shown.render(d) + d.choices[d.label] for d in demos]
    parts.append(task.render(example))
    return task.separator.join(parts), list(example.choices)
