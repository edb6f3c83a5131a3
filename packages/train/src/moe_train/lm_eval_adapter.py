"""An lm-evaluation-harness model for runs and exports (the `moe-train[eval]` extra).

Importing this module registers it under the name `moe` in lm-eval's model registry:

    import moe_train.lm_eval_adapter  # noqa: F401
    lm_eval.simple_evaluate(model="moe", model_args="path=RUN", tasks=[...])

lm-eval finds no plugins of its own, so on the command line `moe-train lm-eval ARGS...` runs
lm-eval's CLI with this module imported (`moe-train lm-eval --model moe --model_args path=RUN
--tasks TASK`). model_args: `path` (a run folder, checkpoint file or export folder), `device`
(auto, cpu, cuda...), `batch_size`, `seed` (of sampled generation), `plugin` (a layer plugin), `trust_plugins`
(import the plugins the run records).

Scoring is `moe-train prime`'s: the context and the continuation are encoded on their own with
the run's tokenizer, the pair cut from the left to seq_len + 1 tokens, and the continuation's
log-likelihood summed from one forward without state (`moe_train.priming.scored_targets`), so a
multiple-choice task scores the same here and in `prime`. Rolling log-likelihoods read the text
as `moe-train eval` does (segments of seq_len, the Transformer-XL memory carried, the other
models seeing each segment on its own); the first token has no context (the vocabularies have no
beginning-of-text token) and is not scored. Generation runs `moe_models.stream` on batches of
prompts of one token length (the models take no padding), with the state each model carries.
"""

from __future__ import annotations

from collections import defaultdict

import moe_models
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from torch.nn import functional as F
from tqdm import tqdm

from moe_train import loading
from moe_train.config import MAX_SEED
from moe_train.errors import CLIError
from moe_train.priming import IGNORE, pad_batch, scored_targets, sequence


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@register_model("moe")
class MoELM(LM):
    def __init__(
        self,
        path: str,
        device: str = "auto",
        batch_size: int | str = 16,
        seed: int = 1234,
        plugin: str | None = None,
        trust_plugins: bool | str = False,
        max_batch_size: int | None = None,
        **unused,
    ) -> None:
        super().__init__()
        if not 0 <= int(seed) <= MAX_SEED:
            raise CLIError(f"model_args seed must be in [0, {MAX_SEED}], got {seed}")
        self.loaded = loading.load(
            path,
            device=device or "auto",
            plugins=[plugin] if plugin else [],
            trust_plugins=str(trust_plugins).lower() in ("true", "1", "yes"),
        )
        self.model = self.loaded.model
        self.vocab = self.loaded.vocab
        # lm-eval's "auto" batch size probes memory; a fixed size is enough for these models
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.seed = int(seed)
        self.seq_len = self.model.config.seq_len

    def _encode(self, text: str) -> list[int]:
        return loading.encode(self.vocab, text)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [
            sequence(self._encode(context), self._encode(continuation), self.seq_len)
            for context, continuation in (r.args for r in requests)
        ]
        # longest first, so each batch pads little
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        bar = tqdm(total=len(pairs), disable=disable_tqdm, desc="loglikelihood")
        for batch in _chunks(order, self.batch_size):
            scores, greedy = scored_targets(
                self.model, [pairs[i] for i in batch], self.loaded.device
            )
            for i, score, is_greedy in zip(batch, scores, greedy, strict=True):
                results[i] = (score, bool(is_greedy))
            bar.update(len(batch))
        bar.close()
        return results

    @torch.no_grad()
    def _rolling(self, texts: list[list[int]]) -> list[float]:
        """Sum log-likelihood of each id list's tokens after the first, read together as a
        right-padded batch in segments of seq_len."""
        inputs, targets = pad_batch([(ids[:-1], ids[1:]) for ids in texts], self.loaded.device)
        totals = torch.zeros(len(texts), dtype=torch.float64, device=self.loaded.device)
        state = None
        for start in range(0, inputs.shape[1], self.seq_len):
            segment = slice(start, start + self.seq_len)
            out = self.model(inputs[:, segment], state=state)
            state = out.state if self.model.carries_state else None
            logp = F.log_softmax(out.logits.float(), dim=-1)
            t = targets[:, segment]
            picked = logp.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            totals += (picked * (t != IGNORE)).double().sum(1)
        return totals.tolist()

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [self._encode(r.args[0]) for r in requests]
        results = [0.0] * len(texts)
        scored = [i for i, ids in enumerate(texts) if len(ids) > 1]
        scored.sort(key=lambda i: -len(texts[i]))
        bar = tqdm(total=len(texts), disable=disable_tqdm, desc="loglikelihood_rolling")
        bar.update(len(texts) - len(scored))
        for batch in _chunks(scored, self.batch_size):
            for i, total in zip(batch, self._rolling([texts[i] for i in batch]), strict=True):
                results[i] = total
            bar.update(len(batch))
        bar.close()
        return results

    def _max_context(self, max_new: int) -> int | None:
        """How many prompt tokens fit: a decoder with learned positions has seq_len of them."""
        cfg = self.model.config
        if cfg.arch == "decoder" and cfg.positions == "learned":
            return max(self.seq_len - max_new, 1)
        return None

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups = defaultdict(list)
        for i, request in enumerate(requests):
            context, options = request.args
            options = dict(options or {})
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(options.pop("max_gen_toks", 256))
            ids = self._encode(context)
            keep = self._max_context(max_new)
            ids = ids[-keep:] if keep else ids
            sample = bool(options.get("do_sample", False)) and options.get("temperature", 1) != 0
            key = (
                len(ids),
                tuple(until),
                max_new,
                sample,
                float(options.get("temperature", 1.0) or 1.0),
                options.get("top_k"),
                options.get("top_p"),
            )
            groups[key].append((i, ids))
        results: list[str | None] = [None] * len(requests)
        generator = torch.Generator(device=self.loaded.device).manual_seed(self.seed)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for (length, until, max_new, sample, temperature, top_k, top_p), items in groups.items():
            for batch in _chunks(items, self.batch_size):
                if length == 0:  # nothing to continue: an empty answer, as stop-at-once
                    for i, _ in batch:
                        results[i] = ""
                    continue
                prompt = torch.tensor([ids for _, ids in batch], device=self.loaded.device)
                new: list[list[int]] = [[] for _ in batch]
                texts = [""] * len(batch)
                tokens = moe_models.stream(
                    self.model,
                    prompt,
                    max_new,
                    greedy=not sample,
                    temperature=temperature,
                    top_k=None if top_k is None else int(top_k),
                    top_p=None if top_p is None else float(top_p),
                    generator=generator,
                )
                for token_B in tokens:
                    for row, token in enumerate(token_B.tolist()):
                        new[row].append(token)
                    texts = [self.vocab.decode(ids) for ids in new]
                    if until and all(any(s in t for s in until) for t in texts):
                        break
                tokens.close()
                for (i, _), text in zip(batch, texts, strict=True):
                    cut = min([text.index(s) for s in until if s in text], default=len(text))
                    results[i] = text[:cut]
            bar.update(len(items))
        bar.close()
        return results
