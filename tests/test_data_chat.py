"""Chat-template application on the tiny offline tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from sae_refusal.data import ChatTemplateError, chat_template_hash, format_prompts, resolve_chat_template
from sae_refusal.data.chat import ChatTemplateFileNotFoundError
from sae_refusal.testing import build_tiny_tokenizer

Tok = PreTrainedTokenizerFast

PLAIN = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer() -> Tok:
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def bare_tokenizer() -> Tok:
    tok = build_tiny_tokenizer(chat_template=None)
    tok.name_or_path = "tiny/no-template"
    return tok


def test_tokenizer_template_with_generation_prompt(tokenizer: Tok) -> None:
    out = format_prompts(tokenizer, ["Hello?", "Bake bread"])
    assert out == [
        "<|im_start|>user\nHello?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nBake bread<|im_end|>\n<|im_start|>assistant\n",
    ]


def test_system_prompt(tokenizer: Tok) -> None:
    (out,) = format_prompts(tokenizer, ["Hi"], system_prompt="Be brief.")
    assert out == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_configured_template_overrides_and_works_without_own(tokenizer: Tok, bare_tokenizer: Tok) -> None:
    expected = ["[user] Hi\n[assistant] "]
    assert format_prompts(tokenizer, ["Hi"], chat_template=PLAIN) == expected
    assert format_prompts(bare_tokenizer, ["Hi"], chat_template=PLAIN) == expected


def test_template_from_file(bare_tokenizer: Tok, tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text(PLAIN)
    assert format_prompts(bare_tokenizer, ["Hi"], chat_template=str(path)) == ["[user] Hi\n[assistant] "]


def test_missing_template_names_tokenizer_and_key(bare_tokenizer: Tok) -> None:
    expected = r"'tiny/no-template' has no chat template; set the config key `chat_template`"
    with pytest.raises(ChatTemplateError, match=expected):
        format_prompts(bare_tokenizer, ["Hi"])
    with pytest.raises(ValueError, match=expected):  # ChatTemplateError is a ValueError
        chat_template_hash(bare_tokenizer)


def test_template_render_error_is_chat_template_error(tokenizer: Tok) -> None:
    rejecting = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}x"
    with pytest.raises(ChatTemplateError, match=r"^chat_template: .*no system role.*system_prompt"):
        format_prompts(tokenizer, ["Hi"], chat_template=rejecting, system_prompt="sys")


def test_texts_must_not_be_a_string(tokenizer: Tok) -> None:
    with pytest.raises(TypeError, match="not one string"):
        format_prompts(tokenizer, "Hi")


def test_chat_template_hash(tokenizer: Tok, bare_tokenizer: Tok) -> None:
    own = chat_template_hash(tokenizer)
    assert len(own) == 64
    assert own == chat_template_hash(build_tiny_tokenizer())
    assert own != chat_template_hash(tokenizer, system_prompt="Be brief.")
    assert own != chat_template_hash(tokenizer, chat_template=PLAIN)
    configured = chat_template_hash(tokenizer, chat_template=PLAIN)
    assert configured == chat_template_hash(bare_tokenizer, chat_template=PLAIN)


def test_template_from_json_file(bare_tokenizer: Tok, tmp_path: Path) -> None:
    expected = ["[user] Hi\n[assistant] "]
    single = tmp_path / "chat_template.json"
    single.write_text(json.dumps({"chat_template": PLAIN}))
    assert format_prompts(bare_tokenizer, ["Hi"], chat_template=str(single)) == expected
    named = tmp_path / "tokenizer_config.json"
    named.write_text(json.dumps({"chat_template": [{"name": "default", "template": PLAIN}]}))
    assert format_prompts(bare_tokenizer, ["Hi"], chat_template=str(named)) == expected
    empty = tmp_path / "other.json"
    empty.write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ChatTemplateError, match=r"^chat_template: .*other.json' holds no `chat_template`"):
        format_prompts(bare_tokenizer, ["Hi"], chat_template=str(empty))


@pytest.mark.parametrize(
    "value", ["templates/chatml.jinja", "chatml.j2", "chat.txt", "~/no/such/template", "C:\\templates\\t"]
)
def test_missing_template_file_is_an_error_naming_the_key(tokenizer: Tok, value: str) -> None:
    expected = rf"^data.cache.chat_template: template file {re.escape(repr(value))} does not exist"
    with pytest.raises(ChatTemplateFileNotFoundError, match=expected):
        format_prompts(tokenizer, ["Hi"], chat_template=value, key="data.cache.chat_template")
    # Both a FileNotFoundError and a ChatTemplateError (a ValueError); the default key is `chat_template`.
    with pytest.raises(FileNotFoundError, match=r"^chat_template: template file"):
        chat_template_hash(tokenizer, value)
    with pytest.raises(ChatTemplateError):
        resolve_chat_template(tokenizer, value)


def test_markup_free_value_that_is_no_file_is_an_error(tokenizer: Tok) -> None:
    with pytest.raises(ChatTemplateError, match=r"^chat_template: 'chatml' is neither a Jinja template"):
        format_prompts(tokenizer, ["Hi"], chat_template="chatml")


@pytest.mark.parametrize(
    ("template", "system_prompt"),
    [
        ("{{ 'You are helpful. Answer:' }}", None),
        (
            "{% for m in messages %}[{{ m['role'] }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}",
            None,
        ),
        ("{{ messages[0]['content'] }}{% if add_generation_prompt %} >{% endif %}", "Be brief."),
    ],
    ids=["constant", "roles-only", "system-only"],
)
def test_template_that_ignores_the_prompt_is_an_error(
    tokenizer: Tok, template: str, system_prompt: str | None
) -> None:
    with pytest.raises(ChatTemplateError, match=r"^llm.chat_template: the configured template renders every"):
        format_prompts(
            tokenizer,
            ["Hi", "Bye"],
            chat_template=template,
            system_prompt=system_prompt,
            key="llm.chat_template",
        )
    with pytest.raises(ChatTemplateError, match="renders every prompt identically"):
        chat_template_hash(tokenizer, template, system_prompt)


def test_tokenizer_template_that_ignores_the_prompt_is_an_error() -> None:
    broken = build_tiny_tokenizer(chat_template="{{ bos_token }}{% if add_generation_prompt %}>{% endif %}")
    broken.name_or_path = "tiny/broken"
    with pytest.raises(
        ChatTemplateError, match=r"^chat_template: the template of 'tiny/broken' renders every"
    ):
        format_prompts(broken, ["Hi"])
