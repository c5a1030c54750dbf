"""Small models built offline, in seconds: a character tokenizer with a tiny Llama (the demo's model)
and a byte-level BPE tokenizer with a small GPT-2- or Llama-style model that has the settings of a
real Hugging Face model (a chat template, pad == eos, two EOS ids, dropout in its config, tied
embeddings). Tests, the demo and `init-model`-style commands build their models here; nothing is
downloaded.

Every builder saves with `save_pretrained`, so `AutoModelForCausalLM` / `AutoTokenizer` load the
folder offline exactly as they would load a hub model. torch, transformers and tokenizers are
imported inside the functions so that importing this module stays cheap.
"""
from __future__ import annotations

import random
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # char tokenizer: ids 0..3, in this order

# BPE tokenizer: ids 0..3, in this order. "<|endoftext|>" is both EOS and pad (as GPT-2 and many chat
# models ship it), "<|im_end|>" ends a chat turn and is the second EOS id of the generation config.
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|bos|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
BPE_SPECIAL_TOKENS = (EOS_TOKEN, BOS_TOKEN, IM_START, IM_END)

# ChatML-like and starting with the BOS: a prompt rendered with it already carries a BOS, so encoding
# that text again with add_special_tokens=True (the post-processor prepends BOS) gives a second one.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ARCHS = ("gpt2", "llama")

# A fixed list of ~60 common words for `default_corpus`: enough variety for BPE to learn real word merges.
_WORDS = (
    "the", "a", "an", "and", "or", "but", "of", "to", "in", "on", "at", "for", "with", "from", "by",
    "is", "are", "was", "were", "be", "has", "have", "had", "do", "does", "did", "can", "will",
    "not", "it", "this", "that", "there", "what", "which", "who", "how", "when", "where", "why",
    "number", "sum", "answer", "question", "add", "two", "three", "four", "five", "ten", "many",
    "more", "less", "first", "last", "model", "reward", "step", "good", "time",
)


# ----------------------------------------------------------------------------- demo tokenizer / model

def build_char_tokenizer(chars: str = "0123456789+-*= ", chat_template: str | None = None):
    """A one-token-per-character tokenizer; returns a `PreTrainedTokenizerFast`.

    Vocabulary: <pad>=0, <bos>=1, <eos>=2, <unk>=3, then `chars` in order. Encoding with special tokens
    prepends <bos>; decoding joins tokens with "" so "123+456=" round-trips exactly. `chat_template`
    (e.g. `CHAR_CHAT_TEMPLATE`, whose characters must be in `chars`) renders conversations.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if len(set(chars)) != len(chars):
        raise ValueError(f"tokenizer characters must be unique, got {chars!r}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: len(SPECIAL_TOKENS) + i for i, c in enumerate(chars)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every char is a word
    tok.decoder = decoders.Fuse()  # WordLevel's default would join words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", padding_side="left", clean_up_tokenization_spaces=False,
        chat_template=chat_template,
    )


def build_tiny_model(out_dir, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                     intermediate_size: int = 344, max_positions: int = 64, seed: int = 0,
                     chars: str = "0123456789+-*= ", chat_template: str | None = None) -> str:
    """Save a randomly initialised Llama plus the character tokenizer as an HF folder; returns its path.

    Llama (not Qwen2) on purpose: with a Qwen2 config, `AutoTokenizer` loads the folder with a Qwen2
    tokenizer class instead of the saved generic one, and that class drops the spaces of the character
    vocabulary. Defaults give ~0.8 M parameters.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_char_tokenizer(chars, chat_template)
    tokenizer.model_max_length = max_positions
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save(model, tokenizer, out_dir)


# ----------------------------------------------------------------------------- BPE tokenizer / model

def default_corpus(seed: int = 0, n: int = 2000) -> list[str]:
    """`n` deterministic lines for fitting the BPE; returns a list of str, the same for the same seed.

    Two kinds of line, alternating, so the BPE learns merges for both: short English-like sentences
    from `_WORDS` ("The sum is not good.") and arithmetic lines ("12+345=357").
    """
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        if i % 2 == 0:
            words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 10))]
            lines.append(" ".join(words).capitalize() + rng.choice((".", "?", "!", ",")))
        else:
            a, b = rng.randint(0, 10 ** rng.randint(1, 4)), rng.randint(0, 10 ** rng.randint(1, 4))
            lines.append(f"{a}+{b}={a + b}")
    return lines


def build_bpe_tokenizer(texts, vocab_size: int = 512):
    """A byte-level BPE fitted on `texts`; returns a `PreTrainedTokenizerFast`.

    Vocabulary: "<|endoftext|>"=0 (EOS and pad), "<|bos|>"=1, "<|im_start|>"=2, "<|im_end|>"=3, then
    the 256 byte symbols, then merges up to `vocab_size`. Encoding with add_special_tokens=True
    prepends "<|bos|>" (as Llama/Gemma tokenizers do), left padding, the ChatML-like `CHAT_TEMPLATE`,
    and clean_up_tokenization_spaces=True as GPT-2/BERT-era tokenizers ship it (so a caller that
    needs exact round-trips has to pass clean_up_tokenization_spaces=False itself). model_max_length
    is left unlimited; `build_bpe_model` sets it to the model's context length.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(BPE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk> needed
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B:1", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        extra_special_tokens=[IM_START, IM_END], padding_side="left",
        clean_up_tokenization_spaces=True, chat_template=CHAT_TEMPLATE,
        # transformers 5 silently skips the clean-up for BPE models unless this is set; older
        # transformers (and other runtimes reading tokenizer_config.json) apply it, so we force it
        # to keep the trap real: a default decode turns "a , b ." into "a, b.".
        clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True,
    )


def build_bpe_model(out_dir, *, arch: str = "gpt2", texts=None, vocab_size: int = 512,
                    hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                    intermediate_size=None, max_positions: int = 128, dropout: float = 0.1,
                    seed: int = 0) -> str:
    """Save a randomly initialised GPT-2 or Llama plus a BPE tokenizer fitted on `texts` (default
    `default_corpus(seed)`) as an HF folder; returns its path.

    The settings are those of a real hub model, because they are what the pipeline gets wrong first:
    pad == eos, dropout > 0 in the config, tied input/output embeddings, and a generation config with
    two EOS ids (end of text and end of turn). "gpt2" has learned absolute positions (n_positions =
    `max_positions`); "llama" has rotary ones.
    """
    import torch
    from transformers import GenerationConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    tokenizer = build_bpe_tokenizer(default_corpus(seed) if texts is None else texts, vocab_size)
    eos_id, bos_id = tokenizer.convert_tokens_to_ids([EOS_TOKEN, BOS_TOKEN])
    ids = dict(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    config = _bpe_config(arch, len(tokenizer), hidden_size, num_layers, num_heads,
                         intermediate_size, max_positions, dropout, ids)
    tokenizer.model_max_length = max_positions  # as hub tokenizers ship it, instead of "unlimited"
    torch.manual_seed(seed)  # same seed, same weights
    model = _causal_lm_class(arch)(config)
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=[eos_id, tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=eos_id,
    )
    return _save(model, tokenizer, out_dir)


def _bpe_config(arch, vocab_size, hidden_size, num_layers, num_heads, intermediate_size,
                max_positions, dropout, ids):
    """The `PretrainedConfig` for `build_bpe_model`; returns a GPT2Config or a LlamaConfig."""
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
            n_inner=intermediate_size, n_positions=max_positions, resid_pdrop=dropout,
            embd_pdrop=dropout, attn_pdrop=dropout, tie_word_embeddings=True, **ids,
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_positions, attention_dropout=dropout,
        tie_word_embeddings=True, **ids,
    )


def _causal_lm_class(arch):
    """The model class for `arch`; returns GPT2LMHeadModel or LlamaForCausalLM."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    return {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM}[arch]


def _save(model, tokenizer, out_dir) -> str:
    """save_pretrained model and tokenizer into `out_dir` (created); returns the folder as a str."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)
