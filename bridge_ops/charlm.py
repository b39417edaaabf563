"""A character-level tokenizer and tiny decoder models, built locally: nothing is downloaded.

For demos, tests and experiments on machines without model weights: `char_tokenizer()` is a HF fast tokenizer (one
token per character, `<s>` prepended, left padding) and `tiny_causal_lm(tokenizer)` a small randomly initialized
Llama / Qwen2 / Qwen3 / Mistral decoder sized for a CPU. `save_tiny_model(dir)` writes both, loadable with
`AutoModelForCausalLM.from_pretrained(dir)` / `AutoTokenizer.from_pretrained(dir)` and `bridge-ops generate`.
"""

import string
from typing import Optional

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
DEFAULT_CHARS = string.digits + string.ascii_lowercase + " +-*/=().,:;?!'\n"


def char_tokenizer(chars: str = DEFAULT_CHARS):
    """A PreTrainedTokenizerFast with one token per character of `chars` (ids after the 4 special tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for ch in dict.fromkeys(chars):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


def tiny_causal_lm(
    tokenizer,
    model_type: str = "llama",
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: Optional[int] = None,
    max_positions: int = 512,
    seed: int = 0,
):
    """A randomly initialized decoder of the given type whose vocabulary and special tokens match `tokenizer`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def save_tiny_model(directory: str, **model_kwargs):
    """Builds a character tokenizer and a tiny model and saves both to `directory`; returns (model, tokenizer)."""
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer, **model_kwargs)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer
