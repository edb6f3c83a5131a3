"""Hugging Face transformers classes for every model here (the `moe-models[hf]` extra).

`MoEConfig` (a `PreTrainedConfig`, model_type "moe-lm") holds the moe_models config as a dict (`moe_model`);
`MoEForCausalLM` wraps the model `moe_models.build` makes from it, under `.model`, so its weights
are `model.<our name>`. Its forward reads the input the way `moe_models.generate` does
(`moe_models.generate.feed`: segments of seq_len, the state carried), so its logits are ours and
its greedy `generate` gives our tokens. The cache `generate` passes from step to step is a
`MoEState`: our state (the Transformer-XL memory, the decoder's key/value cache, the sMLP's token
window) and the number of tokens it has read.

    import moe_models.hf
    moe_models.hf.register()  # AutoConfig / AutoModelForCausalLM know "moe-lm" from now on
    model = transformers.AutoModelForCausalLM.from_pretrained(EXPORT_FOLDER)

Padding is not supported (the models have no attention mask): an attention_mask with zeros is
refused, so batch prompts of one length.
"""

from __future__ import annotations

import torch
import transformers
from torch import Tensor
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from moe_models.api import build
from moe_models.common import IGNORE_INDEX, lm_loss
from moe_models.config import config_from_dict
from moe_models.generate import feed

MODEL_TYPE = "moe-lm"


class MoEConfig(PreTrainedConfig):
    """moe_model: `moe_models.config_to_dict` of the model's config; plugins: the modules or files
    that register its layer types (moe-train records them), to import before loading."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        moe_model: dict | None = None,
        plugins: list | None = None,
        use_cache: bool = True,
        **kwargs,
    ):
        self.moe_model = dict(moe_model or {})
        self.plugins = list(plugins or [])
        self.use_cache = use_cache
        m = self.moe_model
        if m:
            # the names other tools read (sizes, the context), derived from our config
            self.vocab_size = m["vocab_size"]
            self.hidden_size = m["d_model"]
            self.num_hidden_layers = m["n_layers"]
            self.num_attention_heads = m["n_heads"]
            if m["arch"] == "decoder" and m.get("positions") == "learned":
                self.max_position_embeddings = m["seq_len"]
            kwargs.setdefault("tie_word_embeddings", bool(m.get("tie_embeddings", False)))
        super().__init__(**kwargs)


class MoEState(Cache):
    """The cache of `MoEForCausalLM`: our model's state and how many tokens it has read.

    It has no per-layer key/value tensors of transformers' kinds (the XL memory and the sMLP
    window are no such thing), so it cannot be cropped, offloaded or compiled."""

    def __init__(self, state, seen: int) -> None:
        super().__init__(layers=[])
        self.state = state
        self.seen = seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    @property
    def is_croppable(self) -> bool:
        return False

    def _map_batch(self, fn) -> None:
        self.state = torch.utils._pytree.tree_map_only(Tensor, fn, self.state)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))


class MoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MoEConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.head.weight": "model.embedding.weight"}

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        try:
            cfg = config_from_dict(config.moe_model)
        except (KeyError, TypeError, ValueError) as e:
            hint = (
                f" (its layers come from {', '.join(config.plugins)}: import that first)"
                if config.plugins
                else ""
            )
            raise ValueError(
                f"MoEConfig.moe_model is not a valid model config: {e}{hint}"
            ) from None
        self.model = build(cfg)
        self.post_init()

    @classmethod
    def from_moe_model(cls, model: torch.nn.Module, plugins: list | None = None) -> MoEForCausalLM:
        """The wrapper of an existing moe_models model, sharing its parameters."""
        from moe_models.config import config_to_dict

        config = MoEConfig(moe_model=config_to_dict(model.config), plugins=plugins)
        with torch.device("meta"):  # the model built here is replaced: no memory for it
            wrapper = cls(config)
        wrapper.model = model
        return wrapper.to(next(model.parameters()).device)

    def _init_weights(self, module) -> None:
        """Our modules initialise themselves when built; loading overwrites them."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # the state is ours (MoEState), made by forward, not a DynamicCache made by generate
        return False

    def get_input_embeddings(self):
        return self.model.embedding

    def set_input_embeddings(self, value) -> None:
        self.model.embedding = value

    def get_output_embeddings(self):
        return self.model.head

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: MoEState | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: MoEState | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids [B, L] follow the tokens `cache` has read (None: none). labels as in
        transformers (the model shifts them; IGNORE_INDEX -100 is not scored); the loss adds the
        layers' auxiliary losses of the last segment read, as our model's `loss` does."""
        cache = cache if cache is not None else past_key_values
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "attention_mask has zeros: these models take no padding; batch prompts of one length"
            )
        if cache is not None and not isinstance(cache, MoEState):
            if cache.get_seq_length() != 0:
                raise ValueError(
                    f"cache must be the MoEState this model returned, got {type(cache).__name__}"
                )
            cache = None
        out = feed(self.model, input_ids, None if cache is None else cache.state)
        loss = None
        if labels is not None:
            targets = torch.full_like(labels, IGNORE_INDEX)
            targets[:, :-1] = labels[:, 1:]
            loss = lm_loss(out.logits, targets)
            if out.aux_losses:
                loss = loss + sum(out.aux_losses.values())
        use_cache = self.config.use_cache if use_cache is None else use_cache
        seen = (0 if cache is None else cache.seen) + input_ids.shape[1]
        return CausalLMOutputWithPast(
            loss=loss,
            logits=out.logits,
            cache=MoEState(out.state, seen) if use_cache else None,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        next_sequence_length: int | None = None,
        cache: MoEState | None = None,
        attention_mask: Tensor | None = None,
        **kwargs,
    ) -> dict:
        """Only the tokens the cache has not read (all of them at the first step)."""
        if cache is not None and isinstance(cache, MoEState):
            input_ids = input_ids[:, cache.seen :]
            if cache.seen == 0:
                cache = None
        inputs = {"input_ids": input_ids, "cache": cache, "attention_mask": attention_mask}
        if "use_cache" in kwargs:
            inputs["use_cache"] = kwargs["use_cache"]
        return inputs


def register() -> None:
    """Make `AutoConfig` and `AutoModelForCausalLM` know model_type "moe-lm" (calling it again
    does no harm)."""
    transformers.AutoConfig.register(MODEL_TYPE, MoEConfig, exist_ok=True)
    transformers.AutoModelForCausalLM.register(MoEConfig, MoEForCausalLM, exist_ok=True)
