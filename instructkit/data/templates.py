"""Built-in chat templates (Jinja, Hugging Face format) and choosing the template for a run.

Every built-in template wraps each assistant reply *and its end-of-turn token* in
``{% generation %}`` tags, so the loss mask comes from the rendered template's character offsets
(see :mod:`instructkit.data.encode`) rather than from searching for marker strings.

The built-ins render message content verbatim (no ``| trim``): what is trained is exactly what the
data says, and ``encode`` can check that the trained tokens decode back to the assistant content.
Every built-in is prefix-consistent: rendering ``messages[:i]`` with ``add_generation_prompt=True``
is a prefix of rendering ``messages[:i+1]``, which is what generation at inference time relies on.
"""

from __future__ import annotations

import re

# ChatML (Qwen, SmolLM, the tiny models). End of turn is <|im_end|>.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# ChatML with a space before each reply, for word-level byte-BPE tokenizers whose words carry their
# leading space (" lantern"). A reply then starts with the same token as the word in the prompt, as Llama
# 2's "[/INST] " does; with plain ChatML the first word after the newline is a different id ("lantern"),
# which a tiny model cannot copy. The space is inside the generation block (the model emits it as part
# of the first word); generate() drops it from the reply text. Used by the demo's tiny models.
CHATML_REPLY_SPACE = CHATML.replace("{{ message['content'] + '<|im_end|>' }}{% endgeneration %}",
                                    "{{ ' ' + message['content'] + '<|im_end|>' }}{% endgeneration %}")
assert CHATML_REPLY_SPACE != CHATML

# Llama 3 instruct format. The official template trims content; this one keeps it verbatim (see the
# module docstring). The BOS token is part of the format, so it is rendered when the tokenizer has one.
LLAMA3 = (
    "{% if bos_token is defined and bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Zephyr (HuggingFaceH4). Role markers are plain text, as in the original; only the end-of-turn
# token </s> has to be a single token, so the model can emit it and generation can stop on it.
ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '</s>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '</s>' + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Alpaca-style plain text. A system message becomes the preamble; no default preamble is added, so
# nothing reaches the model that is not in the data. Each reply ends with the tokenizer's eos token.
ALPACA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Response:\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{{ '\\n\\n' }}"
    "{% else %}{{ raise_exception('the alpaca template supports the roles system, user and assistant, "
    "not ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)

# The simplest possible format, for base models with no chat conventions: a "role:" line, then the
# content. The role line ends in a newline, not "role: " with a space, because a prompt ending in a
# space does not end at a token boundary: byte-level BPE merges that space into the reply's first
# word (" ok"), so training would see tokens the inference prompt never produces.
PLAIN = (
    "{% for message in messages %}"
    "{{ message['role'] + ':\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    "llama3": LLAMA3,
    "zephyr": ZEPHYR,
    "alpaca": ALPACA,
    "plain": PLAIN,
}

# The string that ends an assistant turn; None means the tokenizer's eos_token. Generation stops on it.
TEMPLATE_EOT: dict[str, str | None] = {
    "chatml": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "zephyr": "</s>",
    "alpaca": None,
    "plain": None,
}

# Strings each template needs as single tokens. Role headers of llama3 are special tokens in the real
# Llama 3 vocabulary; a model trained with them split into pieces would not match that format.
_REQUIRED_TOKENS: dict[str, list[str]] = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "zephyr": ["</s>"],
    "alpaca": [],
    "plain": [],
}

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateError(ValueError):
    """The chat template cannot be used with this tokenizer; the message says how to fix it."""


def _check_name(name: str) -> None:
    if name not in BUILTIN_TEMPLATES:
        raise TemplateError(
            f"unknown chat template '{name}'. Fix: set data.template to 'auto' (the tokenizer's own) or "
            f"one of the built-ins: {', '.join(BUILTIN_TEMPLATES)}")


def has_generation_tags(template: str) -> bool:
    """Whether a Jinja chat template marks assistant text with ``{% generation %}`` tags."""
    return bool(_GENERATION_TAG.search(template))


def template_source(template: str) -> str:
    """The Jinja source for a built-in name, or ``template`` itself when it already is Jinja."""
    if template in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[template]
    if "{%" in template or "{{" in template:
        return template
    _check_name(template)  # raises with the list of names
    return template  # unreachable


def required_special_tokens(name: str) -> list[str]:
    """Strings a built-in template needs to exist as single tokens in the tokenizer.

    The eos token used by ``alpaca`` and ``plain`` is not listed: it is the tokenizer's own.
    """
    _check_name(name)
    return list(_REQUIRED_TOKENS[name])


def _is_single_token(tokenizer, text: str) -> bool:
    # Encoding (not a vocabulary lookup) is what matters: the string inside rendered text must come
    # out as exactly one token, or the model could never emit it in one step.
    ids = tokenizer.encode(text, add_special_tokens=False)
    return len(ids) == 1


def missing_template_tokens(tokenizer, name: str) -> list[str]:
    """The required tokens of built-in template ``name`` that ``tokenizer`` lacks."""
    return [t for t in required_special_tokens(name) if not _is_single_token(tokenizer, t)]


def ensure_template_tokens(tokenizer, name: str) -> int:
    """Add a built-in template's missing special tokens to ``tokenizer`` (in place).

    Args:
        tokenizer: A Hugging Face tokenizer.
        name: A key of ``BUILTIN_TEMPLATES``.

    Returns:
        How many tokens were added; when more than zero the caller must resize the model's
        embeddings (``model.resize_token_embeddings(len(tokenizer))``).
    """
    missing = missing_template_tokens(tokenizer, name)
    if not missing:
        return 0
    # special_tokens=True keeps them whole inside any text and lets decode(skip_special_tokens=True)
    # drop them from generated replies.
    return tokenizer.add_tokens(missing, special_tokens=True)


def end_of_turn_token(tokenizer, name: str) -> str:
    """The string that ends an assistant turn for built-in template ``name`` (a generation stop)."""
    _check_name(name)
    eot = TEMPLATE_EOT[name] or tokenizer.eos_token
    if eot is None:
        raise TemplateError(f"template '{name}' ends replies with the tokenizer's eos_token, but this "
                            "tokenizer has none. Fix: pick a template with its own end-of-turn token "
                            "(e.g. chatml) and set data.add_special_tokens: true")
    return eot


def resolve_template(tokenizer, name: str = "auto") -> str:
    """Choose the Jinja chat template for a run.

    Args:
        tokenizer: The model's tokenizer.
        name: ``"auto"`` for the tokenizer's own template, or a key of ``BUILTIN_TEMPLATES`` to force
            that format (e.g. for a base model).

    Returns:
        The Jinja source of the template.

    Raises:
        TemplateError: ``auto`` and the tokenizer has no template; an unknown name; or a built-in whose
            special tokens are missing from the tokenizer (fix: ``data.add_special_tokens: true``).
    """
    if name == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # some tokenizers carry several named templates
            own = own.get("default")
        if not own:
            raise TemplateError(
                "data.template is 'auto' but this model's tokenizer has no chat template (usual for base "
                "models). Fix: set data.template to one of the built-ins: "
                f"{', '.join(BUILTIN_TEMPLATES)} (chatml is a good default; add "
                "data.add_special_tokens: true if the tokenizer lacks its tokens)")
        return own
    _check_name(name)
    missing = missing_template_tokens(tokenizer, name)
    if missing:
        raise TemplateError(
            f"template '{name}' needs the tokens {', '.join(missing)}, which this tokenizer does not have "
            "as single tokens. Fix: set data.add_special_tokens: true (adds them and resizes the "
            "embeddings) or pick another template")
    if TEMPLATE_EOT[name] is None and tokenizer.eos_token is None:
        end_of_turn_token(tokenizer, name)  # raises with the fix
    return BUILTIN_TEMPLATES[name]
