"""Tiny Llama-architecture models with a locally trained tokenizer, for tests and the CPU demo.

Nothing is downloaded: the byte-level BPE tokenizer is trained here on a built-in corpus (or one the
caller passes), and the weights are random for a seed. The result is an ordinary Hugging Face folder
that ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load offline.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

from instructkit.data.templates import CHATML, CHATML_REPLY_SPACE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# name -> (hidden, layers, heads, kv_heads, intermediate, vocab). Parameter counts with tied
# embeddings: nano ~1.1M, micro ~3.6M, small ~25M. The built-in corpus yields ~1.9k tokens, so
# vocab_size is an upper bound; a richer corpus (e.g. the skills corpus) fills more of it.
PRESETS: dict[str, dict[str, int]] = {
    "nano": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=384, vocab_size=2048),
    "micro": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=768, vocab_size=4096),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=1408, vocab_size=8192),
}

_WORDS = (
    "the a an and or but if then else when while for to of in on at by with from as is are was were be "
    "been being have has had do does did will would can could should may might must shall not no yes "
    "i you he she it we they me him her us them my your his its our their this that these those what "
    "which who whom whose where why how all any each every some many much more most less few other such "
    "only own same so than too very just also now here there up down out over under again once about "
    "answer question write list sort number numbers word words sentence text letter letters first last "
    "largest smallest sum difference product count reverse upper lower case json key value email date "
    "positive negative neutral true false please explain describe summarize translate give name find "
    "make use help tell say need want know think see look come go get take good bad great new old long "
    "short big small high low right left time day year people world work life hand part place case week "
    "company system program problem fact group point government number water money story month book eye "
    "job family student teacher city country house school computer data model language python code "
    "function return print string list dict error file line field assistant user system human hello "
    "thanks sorry clarify cannot unclear request instruction response example output input result "
    "red green blue apple banana orange cat dog bird fish tree river mountain music art science history"
).split()


def default_corpus(seed: int = 0, n_lines: int = 4000) -> list[str]:
    """A deterministic built-in corpus: English-like lines with numbers, punctuation and JSON."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        kind = i % 4
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if kind == 0:
            lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ":"]))
        elif kind == 1:
            nums = [str(rng.randint(0, 9999)) for _ in range(rng.randint(2, 6))]
            lines.append(f"{' '.join(words[:5])}: {', '.join(nums)}; - {words[-1].upper()}")
        elif kind == 2:
            lines.append('{"' + words[0] + '": "' + " ".join(words[1:4]) + '", "n": ' + str(rng.randint(0, 99)) + "}")
        else:
            lines.append(f"- {words[0]} ({words[1]}) [{words[2]}] 'x' \"y\" @ # $ % & * + = / \\ < > | ~ ^ `")
    return lines


def train_tokenizer(corpus: Iterable[str], vocab_size: int, chat_template: str | None = None,
                    isolate_spaces: bool = False, reply_space: bool = False):
    """Train a byte-level BPE tokenizer (digits split one by one) and wrap it for transformers.

    Byte-level means every string is encodable, so the tiny models never meet an unknown token.

    Args:
        corpus: Training text.
        vocab_size: Upper bound on the vocabulary.
        chat_template: Jinja chat template stored with the tokenizer; ChatML when None.
        isolate_spaces: Keep whitespace out of word tokens, so a word is the same token after a
            space, after a newline or at the start of a reply. GPT-style BPE gives " lantern" and
            "lantern" different ids; a tiny model then cannot copy a word from the prompt into a
            reply that starts after a newline (it must emit an id it has almost never seen). Costs
            about 40% more tokens, and the spaces between words cost a model positions that carry
            no information (copying must look past them).
        reply_space: Store ChatML with a space before each reply (``CHATML_REPLY_SPACE``, when
            ``chat_template`` is None). With GPT-style tokens this gives the same fix at no cost in
            tokens: the reply's first word is " lantern", as in the prompt. The demo uses this.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Individual digits give arithmetic tasks a consistent token per digit.
    pieces = [pre_tokenizers.Digits(individual_digits=True)]
    if isolate_spaces:
        pieces.insert(0, pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        pieces + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
    )
    fast.chat_template = chat_template or (CHATML_REPLY_SPACE if reply_space else CHATML)
    fast.model_max_length = 2048
    return fast


def build_tiny_model(out_dir: str | Path, preset: str = "nano", seed: int = 0,
                     corpus: Iterable[str] | None = None, max_position_embeddings: int = 2048,
                     isolate_spaces: bool = False, reply_space: bool = False) -> Path:
    """Write a tiny ``LlamaForCausalLM`` and its tokenizer to ``out_dir``; deterministic for a seed.

    Args:
        out_dir: Folder to write (created).
        preset: One of ``PRESETS``.
        seed: Seeds the corpus, tokenizer training order and weight init.
        corpus: Text lines for the tokenizer; the built-in corpus when None.
        max_position_embeddings: Longest sequence the model supports.
        isolate_spaces: See :func:`train_tokenizer`.
        reply_space: See :func:`train_tokenizer` (the demo turns it on).

    Returns:
        The output folder.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    spec = dict(PRESETS[preset])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus if corpus is not None else default_corpus(seed), spec["vocab_size"],
                                isolate_spaces=isolate_spaces, reply_space=reply_space)
    config = LlamaConfig(
        **spec,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
        attention_bias=False,
        initializer_range=0.02,
    )
    config.vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

