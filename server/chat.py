"""Prompt rendering with the base's chat template, and the set of tokens that end a turn."""
from __future__ import annotations

from server.protocol import ChatMessage

# Used only when a base folder carries no chat template of its own.
FALLBACK_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
END_OF_TURN_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


def render_prompt(tokenizer, messages: list[ChatMessage]) -> list[int]:
    # "developer" is OpenAI's newer name for the system role; templates only know "system".
    conversation = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages
    ]
    template = None if tokenizer.chat_template else FALLBACK_CHATML
    ids = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=False, chat_template=template
    )
    return list(ids)


def base_stop_token_ids(tokenizer, generation_config) -> frozenset[int]:
    """EOS of the tokenizer and generation config, plus the template's end-of-turn token."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    config_eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(config_eos)
    template = tokenizer.chat_template or FALLBACK_CHATML
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_CANDIDATES:
        if token in template and token in vocab:
            ids.add(vocab[token])
    return frozenset(ids)
