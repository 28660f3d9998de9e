"""configuration_tptt - the transformers config of an exported tptt Titan
(`model_type` "tptt_titan"). Every field of the base model's config.json is
kept as an attribute; `liza`, `mag`, `base_model_type`, `base_architecture`
and `tptt_export` describe the Titan (see tptt_titan_math.py)."""

from transformers import PretrainedConfig


class TpttTitanConfig(PretrainedConfig):
    model_type = "tptt_titan"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                 max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                 attention_bias=False, tie_word_embeddings=False, base_model_type="llama",
                 base_architecture="LlamaForCausalLM", liza=None, mag=None, tptt_export=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.base_model_type = base_model_type
        self.base_architecture = base_architecture
        # Mistral: an absent sliding_window means MistralConfig's default 4096, null means none
        self.sliding_window = kwargs.pop("sliding_window", 4096 if base_model_type == "mistral" else None)
        self.liza = liza
        self.mag = mag
        self.tptt_export = tptt_export
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
