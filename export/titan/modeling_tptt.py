"""modeling_tptt - transformers glue of an exported tptt Titan.

The parameters carry the standard HF names (model.embed_tokens.weight,
model.layers.{l}.self_attn.q_proj.weight, ..., model.layers.{l}.self_attn.mag_logit,
lm_head.weight), so from_pretrained fills them from the export's safetensors;
the computation is tptt_titan_math.TitanMath on those very tensors, and
past_key_values is its TitanCache (KV cache / window ring, LiZA states, raw
k/v history, position). Batches of equal-length rows only: an attention_mask
with zeros (padding) is refused.
"""

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from transformers import GenerationMixin
except ImportError:  # older transformers
    from transformers.generation import GenerationMixin

try:
    from .configuration_tptt import TpttTitanConfig
    from .tptt_titan_math import TitanCache, TitanMath
except ImportError:  # imported as plain modules (the export directory on sys.path)
    import importlib
    TpttTitanConfig = importlib.import_module("configuration_tptt").TpttTitanConfig
    _tm = importlib.import_module("tptt_titan_math")
    TitanCache, TitanMath = _tm.TitanCache, _tm.TitanMath


class _Weight(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))


class _Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
        d = c.head_dim
        bias = c.base_model_type == "qwen2" or bool(getattr(c, "attention_bias", False))
        self.q_proj = nn.Linear(D, H * d, bias=bias)
        self.k_proj = nn.Linear(D, Hkv * d, bias=bias)
        self.v_proj = nn.Linear(D, Hkv * d, bias=bias)
        self.o_proj = nn.Linear(H * d, D, bias=False)
        mag = c.mag or {}
        if c.liza is not None and mag.get("mode") == "learnable":
            n = 1 if mag.get("learnable_shape", "scalar") == "scalar" else D
            self.mag_logit = nn.Parameter(torch.zeros(n, dtype=torch.float32))


class _MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        D, F = c.hidden_size, c.intermediate_size
        self.gate_proj = nn.Linear(D, F, bias=False)
        self.up_proj = nn.Linear(D, F, bias=False)
        self.down_proj = nn.Linear(F, D, bias=False)


class _Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = _Weight(c.hidden_size)
        self.self_attn = _Attention(c)
        self.post_attention_layernorm = _Weight(c.hidden_size)
        self.mlp = _MLP(c)


class _Backbone(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([_Layer(c) for _ in range(c.num_hidden_layers)])
        self.norm = _Weight(c.hidden_size)


class TpttTitanForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TpttTitanConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    # transformers >= 5 wants {tied: source}; 4.x a list (TitanMath reads the embedding itself when tied)
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} \
        if int(str(getattr(transformers, "__version__", "4")).split(".")[0]) >= 5 else ["lm_head.weight"]
    _keep_in_fp32_modules = ["mag_logit"]
    _no_split_modules = ["_Layer"]
    _supports_cache_class = False
    _is_stateful = True  # the LiZA state cannot be cropped (no assisted/contrastive decoding)

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # past_key_values is a TitanCache, never a DynamicCache

    def __init__(self, config):
        super().__init__(config)
        self.model = _Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def titan_math(self):
        """TitanMath on this module's parameters (no copies: dtype=None)."""
        tensors = dict(self.named_parameters())
        if not self.config.tie_word_embeddings:
            tensors["lm_head.weight"] = self.lm_head.weight
        return TitanMath(self.config.to_dict(), tensors, dtype=None)

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, labels=None, use_cache=None,
                return_dict=None, logits_to_keep=0, **kwargs):
        if input_ids is None:
            raise ValueError("TpttTitanForCausalLM needs input_ids (inputs_embeds are not supported)")
        if attention_mask is not None and not bool(torch.all(attention_mask != 0)):
            raise NotImplementedError("TpttTitanForCausalLM: padding (attention_mask zeros) is not supported; "
                                      "batch rows of equal length")
        if not isinstance(past_key_values, TitanCache):
            if past_key_values is not None and hasattr(past_key_values, "get_seq_length") \
                    and past_key_values.get_seq_length() == 0:
                past_key_values = None  # an empty cache made by generate()
            elif past_key_values is not None:
                raise TypeError("past_key_values must be a TitanCache from this model, not %s"
                                % type(past_key_values).__name__)
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        logits, cache = self.titan_math().forward(input_ids, past_key_values)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, use_cache=True,
                                      **kwargs):
        if isinstance(past_key_values, TitanCache) and past_key_values.pos > 0:
            input_ids = input_ids[:, past_key_values.pos:]
        return {"input_ids": input_ids, "past_key_values": past_key_values, "attention_mask": attention_mask,
                "use_cache": use_cache}

    def _reorder_cache(self, past_key_values, beam_idx):
        for lc in past_key_values.layers:
            for f in ("k", "v", "S", "hk", "hv"):
                t = getattr(lc, f)
                if t is not None:
                    setattr(lc, f, t.index_select(0, beam_idx.to(t.device)))
        return past_key_values

