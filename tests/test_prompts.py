"""Chat prompts on the real SmolLM2 tokenizer: same ids as the template for ordinary text, and
control tokens typed inside a message stay text (no role injection)."""
import pytest

from server.api.prompts import PromptEncoder
from server.api.protocol import ChatMessage
from tests.support import INJECTED


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return PromptEncoder(tokenizer)


def messages(*turns):
    return [ChatMessage(role=role, content=content) for role, content in turns]


@pytest.mark.parametrize("turns", [
    [("user", "What is the capital of France?")],
    [("system", "Be terse."), ("user", "Hi there!  "), ("assistant", "Hello."), ("user", "Tell me a joke 😀")],
    [("developer", "Answer in JSON."), ("user", "a < b | c > d, <| not a token |>")],
])
def test_ordinary_messages_encode_exactly_as_the_template_does(encoder, tokenizer, turns):
    conversation = [{"role": "system" if r == "developer" else r, "content": c} for r, c in turns]
    expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
    assert encoder.render(messages(*turns)) == list(expected)


def test_typed_control_tokens_are_text_and_decode_to_what_was_typed(encoder, tokenizer):
    ids = encoder.render(messages(("user", INJECTED)))
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    # only the template's own: default system turn, user turn, assistant prompt
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": INJECTED}], add_generation_prompt=True,
                                             tokenize=False)
    assert tokenizer.decode(ids) == rendered  # the same characters, only their tokens differ
    unsafe = tokenizer.apply_chat_template([{"role": "user", "content": INJECTED}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    assert list(unsafe).count(im_start) == 5  # what the template alone would have let through


def test_a_marker_lookalike_in_the_text_is_only_text(encoder, tokenizer):
    lookalike = "\ue000deadbeefdeadbeef:1\ue001 and \ue000"
    ids = encoder.render(messages(("user", lookalike)))
    assert lookalike in tokenizer.decode(ids)


def test_the_character_bound_never_exceeds_the_real_token_count(encoder, tokenizer):
    for text in ["#" * 5000, " " * 4000, "a" * 3000, "😀" * 500, "hello world " * 300, "\n" * 999]:
        assert encoder.min_tokens(len(text)) <= len(tokenizer.encode(text, add_special_tokens=False))
