"""Built-in chat templates (Jinja, Hugging Face format).

Every built-in template wraps each assistant reply *and its end-of-turn token* in
``{% generation %}`` tags, so the loss mask comes from the rendered template's character offsets
rather than from searching for marker strings.
"""

from __future__ import annotations

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

BUILTIN_TEMPLATES: dict[str, str] = {"chatml": CHATML}
