"""Tiny randomly initialised models for tests: `tiny-neox` (GPT-NeoX/Pythia-like) and `tiny-llama`.

Built from a config with a fixed seed, with a byte-level BPE tokenizer trained in-process on the
Python docs topics, so they need no network and are identical on every machine.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SEED = 0
VOCAB = 512
SIZES = dict(hidden=64, layers=4, heads=4, mlp=256, context=256)
EOS = "<|endoftext|>"


@lru_cache(maxsize=1)
def tiny_tokenizer_json() -> str:
    """Train a small byte-level BPE tokenizer on the pydoc topics (deterministic)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [topics[key] for key in sorted(topics)]
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tiny_tokenizer_json()),
        eos_token=EOS,
        bos_token=EOS,
        unk_token=EOS,
        model_max_length=SIZES["context"],
    )


def build_tiny(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """(model, tokenizer, revision) for `tiny-neox` or `tiny-llama`."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    common = dict(
        vocab_size=len(tok),
        hidden_size=SIZES["hidden"],
        num_hidden_layers=SIZES["layers"],
        num_attention_heads=SIZES["heads"],
        intermediate_size=SIZES["mlp"],
        max_position_embeddings=SIZES["context"],
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    if name == "tiny-neox":
        config, cls = GPTNeoXConfig(**common, rotary_pct=0.25), GPTNeoXForCausalLM
    elif name == "tiny-llama":
        config, cls = LlamaConfig(**common, num_key_value_heads=2), LlamaForCausalLM
    else:
        raise ValueError(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = cls(config)
    return model, tok, f"{name}-seed{SEED}"
