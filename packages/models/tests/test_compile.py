"""torch.compile(fullgraph=True) of every tiny preset, in training and eval mode: the compiled
model's logits, losses and gradients equal the eager model's, also when it is given the state of
its previous call (the Transformer-XL memory), and batches of another shape recompile at most
once for each kind of call (without a state and, for Transformer-XL, with one). A graph break
would fail fullgraph. `aot_eager` for all (inductor's code generation is slow on small CI
machines), inductor for one preset. Dropout is off: the compiled graph draws its random numbers
in another order."""

import dataclasses

import moe_models
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

# twins that differ from a listed preset in sizes alone: compile time without new coverage
# (test_host_reads.py leaves out the same ones)
SAME_STRUCTURE = {
    "tiny-olmoe-dense-compute",
    "tiny-deepseek-dense-params",
    "tiny-deepseek-dense-compute",
    "tiny-switchhead-dense",
}
TINY = [n for n in moe_models.presets() if n.startswith("tiny-") and n not in SAME_STRUCTURE]
# two layers keep the graphs, and so the compilation, small
SMALL = dict(n_layers=2, dropout=0.0)
# (batch, length) of the calls: the second shape makes both dynamic, the third reuses that graph
SHAPES = [(2, 16), (3, 12), (2, 20)]


def _step(model, fn, tokens, state, training):
    model.zero_grad(set_to_none=True)
    out = fn(tokens, tokens, state=state)
    if training:
        out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    result = (
        out.logits.detach(),
        out.loss.detach(),
        {k: v.detach() for k, v in out.aux_losses.items()},
    )
    return result, grads, out.state


def check_compiled_matches_eager(name, backend, training, shapes=SHAPES) -> tuple:
    """Returns the compiled frames and the number of kinds of call (with and without a state)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = moe_models.build(name, **SMALL).train(training)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(0)
    kinds = 2 if model.carries_state else 1
    with torch.set_grad_enabled(training):
        for batch, length in shapes:
            tokens = torch.randint(model.config.vocab_size, (batch, length), generator=gen)
            state = None
            for _ in range(kinds):
                torch.manual_seed(1)
                got, got_grads, got_state = _step(model, compiled, tokens, state, training)
                torch.manual_seed(1)
                want, want_grads, state = _step(model, model, tokens, state, training)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got_grads, want_grads, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got_state, state)
    return counter.frame_count, kinds


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", TINY)
def test_fullgraph_compile_matches_eager_and_recompiles_at_most_once(name, training):
    frames, kinds = check_compiled_matches_eager(name, "aot_eager", training)
    assert frames <= 2 * kinds


def test_inductor_compile_matches_eager():
    """One shape, one compilation: inductor's code generation is slow on a small machine."""
    frames, _ = check_compiled_matches_eager("tiny-gshard", "inductor", True, shapes=SHAPES[:1])
    assert frames == 1


def _structure(value):
    """The config with every size taken out (a number stays only as zero or not)."""
    if dataclasses.is_dataclass(value):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return (type(value).__name__, _structure(fields))
    if isinstance(value, dict):
        return tuple(sorted((k, _structure(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_structure(v) for v in value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value == 0
    return value


@pytest.mark.parametrize("name", sorted(SAME_STRUCTURE))
def test_left_out_presets_have_a_listed_twin_of_the_same_structure(name):
    listed = {_structure(moe_models.get_config(n)) for n in TINY}
    assert _structure(moe_models.get_config(name)) in listed
