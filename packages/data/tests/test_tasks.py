"""Priming tasks: the shipped example, one error per kind of bad line, and the k-shot prompt."""

import json

import moe_data
import pytest
from hypothesis import given
from hypothesis import strategies as st
from moe_data import DataError, Example, Task, build_prompt, load_tasks


def jsonl(*objs) -> str:
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs)


GOOD = {"context": "Two plus two is", "choices": [" four", " five"], "label": 0}


def test_shipped_example_task():
    task = load_tasks(moe_data.example_task_path())
    assert task.name == "kjv-verse-completion" and task.separator == "\n"
    assert len(task.examples) >= 50
    assert all(len(e.choices) == 4 for e in task.examples)
    corpus = moe_data.default_corpus()
    test_text = corpus.decode(corpus.test)
    for e in task.examples[:20]:
        assert e.context + e.choices[e.label] in test_text
        corpus.encode(e.context + "".join(e.choices))


def test_header_and_defaults(write):
    header = {"name": "arith", "template": "Q: {context}\nA:", "separator": "\n---\n"}
    task = load_tasks(write("t.jsonl", jsonl(header, GOOD, "", {**GOOD, "label": 1, "id": 7})))
    assert task.name == "arith" and len(task.examples) == 2
    assert task.examples[1].extra == {"id": 7}
    assert task.render(task.examples[0]) == "Q: Two plus two is\nA:"
    plain = load_tasks(write("plain.jsonl", jsonl(GOOD)))
    assert plain.name == "plain" and plain.template == "{context}" and plain.separator == "\n\n"


@pytest.mark.parametrize(
    "lines, message",
    [
        ([GOOD, "{oops"], "t.jsonl:2: not valid JSON"),
        ([GOOD, "[1, 2]"], "t.jsonl:2: expected a JSON object, got list"),
        ([{"choices": [" a", " b"], "label": 0}], "t.jsonl:1: missing field 'context'"),
        (
            [{**GOOD, "choices": [" only"]}],
            "t.jsonl:1: field 'choices' must be a list of at least two",
        ),
        (
            [{**GOOD, "choices": [" a", 3]}],
            "t.jsonl:1: field 'choices' item 1 must be a non-empty string",
        ),
        ([{**GOOD, "label": "0"}], "t.jsonl:1: field 'label' must be an integer, got str"),
        ([{**GOOD, "label": True}], "t.jsonl:1: field 'label' must be an integer, got bool"),
        ([GOOD, {**GOOD, "label": 2}], "t.jsonl:2: field 'label' is 2, outside [0, 2)"),
        ([{**GOOD, "context": None}], "t.jsonl:1: field 'context' must be a string"),
        (
            [{**GOOD}, {k: v for k, v in GOOD.items() if k != "choices"}],
            "t.jsonl:2: missing field 'choices'",
        ),
        (
            [{"template": "no placeholder"}, GOOD],
            "t.jsonl:1: field 'template' must contain {context}",
        ),
        ([{"templat": "{context}"}, GOOD], "t.jsonl:1: header has unknown field(s) ['templat']"),
        ([{"separator": 3}, GOOD], "t.jsonl:1: field 'separator' must be a string"),
        (
            [GOOD, {"name": "late"}],
            "t.jsonl:2: a header (no context, choices or label) may only be the first line",
        ),
        ([{"name": "empty"}], "holds no examples"),
    ],
)
def test_bad_lines(write, lines, message):
    with pytest.raises(DataError) as err:
        load_tasks(write("t.jsonl", jsonl(*lines)))
    assert message in str(err.value)


def test_bad_files(write, tmp_path):
    with pytest.raises(DataError, match="task file .* does not exist"):
        load_tasks(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="empty"):
        load_tasks(write("e.jsonl", ""))
    with pytest.raises(DataError, match="not UTF-8"):
        load_tasks(write("b.jsonl", b"\xff\xfe"))


def toy_task(n: int) -> Task:
    examples = [Example(f"ctx{i}", (f" a{i}", f" b{i}", f" c{i}"), i % 3) for i in range(n)]
    return Task("toy", examples, template="[{context}]", separator=" | ")


@given(st.integers(2, 12), st.data())
def test_prompt_demonstrations(n, data):
    task = toy_task(n)
    index = data.draw(st.integers(0, n - 1))
    k = data.draw(st.integers(0, n - 1))
    seed = data.draw(st.integers(0, 2**32 - 1))
    prefix, choices = build_prompt(task, index, k, seed)
    example = task.examples[index]
    assert choices == list(example.choices)
    parts = prefix.split(" | ")
    assert len(parts) == k + 1 and parts[-1] == f"[ctx{index}]"
    demos = parts[:-1]
    assert len(set(demos)) == k
    for demo in demos:
        i = int(demo[len("[ctx") : demo.index("]")])
        assert i != index
        assert demo == f"[ctx{i}]" + task.examples[i].choices[task.examples[i].label]
    assert build_prompt(task, example, k, seed) == (prefix, choices)


def test_prompt_seed_changes_demonstrations():
    task = toy_task(30)
    prompts = {build_prompt(task, 0, 3, seed)[0] for seed in range(10)}
    assert len(prompts) > 1
    assert len({build_prompt(task, i, 3, 0)[0].split(" | ")[0] for i in range(30)}) > 1


def test_prompt_from_separate_train_task():
    task, train = (
        toy_task(3),
        Task("train", [Example("T", (" yes", " no"), 1)], template="<{context}>"),
    )
    prefix, _ = build_prompt(task, 2, 1, seed=0, train=train)
    assert prefix == "<T> no | [ctx2]"


def test_prompt_bad_arguments():
    task = toy_task(3)
    with pytest.raises(
        ValueError, match="k_shot=3 needs that many other examples; task 'toy' has 2"
    ):
        build_prompt(task, 0, 3, 0)
    with pytest.raises(ValueError, match="k_shot"):
        build_prompt(task, 0, -1, 0)
    with pytest.raises(ValueError, match="seed"):
        build_prompt(task, 0, 1, -5)
    with pytest.raises(ValueError, match="example index 9"):
        build_prompt(task, 9, 1, 0)
