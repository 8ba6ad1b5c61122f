"""An imported model's own chat setup: what a released model (Qwen, Llama 3, SmolLM2, Mistral, ...) keeps
beside its ``tokenizer.json`` and ``model/tokenizer.py::TinyMindTokenizer`` uses in place of ChatML.

What this file implements:
- ``OwnChat``: the Jinja chat template, the special tokens it names (bos/eos/pad/unk) and the end-of-turn ids
  generation stops at (``generation_config.json``'s ``eos_token_id``, one id or a list);
- ``companion_files`` / ``read_own_chat``: where those files are (``dir/tokenizer_config.json`` beside
  ``dir/tokenizer.json``; ``out/x_tokenizer_config.json`` beside the ``out/x_tokenizer.json`` an import
  keeps) and reading them (the template inside ``tokenizer_config.json`` or in ``chat_template.jinja``);
- ``compile_template`` / ``render_template``: the template in the Jinja environment transformers renders it
  in, with the same variables, so that the prompt text is the one ``AutoTokenizer.apply_chat_template``
  gives (tests/test_hf_families.py checks it for each family).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from model.common import TinyMindError, read_json


@dataclass
class OwnChat:
    """The chat setup a released model comes with (``tokenizer_config.json`` + ``generation_config.json``)."""
    template: str                   # the Jinja chat template
    specials: dict[str, str]        # bos_token / eos_token / pad_token / unk_token -> text (those it names)
    stop_ids: tuple[int, ...] = ()  # generation_config.json's eos_token_id(s); () -> the eos token alone


def companion_files(path: Path) -> dict[str, Path] | None:
    """The files a transformers folder keeps beside ``tokenizer.json``, by the same prefix: for
    ``dir/tokenizer.json`` -> ``dir/tokenizer_config.json`` ...; for ``out/x_tokenizer.json`` (what an import
    keeps) -> ``out/x_tokenizer_config.json`` .... None for a file not named ``*tokenizer.json``."""
    if not path.name.endswith("tokenizer.json"):
        return None
    prefix = path.name[:-len("tokenizer.json")]
    return {name: path.with_name(prefix + name)
            for name in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json")}


def _text(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": string, ...}."""
    return token.get("content") if isinstance(token, dict) else token


def read_own_chat(path: Path) -> OwnChat | None:
    """The chat setup stored beside ``path`` (a ``*tokenizer.json``), or None where there is no template."""
    files = companion_files(path)
    if files is None or not files["tokenizer_config.json"].is_file():
        return None
    config = read_json(files["tokenizer_config.json"], "tokenizer_config.json")
    template = config.get("chat_template")
    if files["chat_template.jinja"].is_file():   # newer transformers keep the template in a file of its own
        template = files["chat_template.jinja"].read_text(encoding="utf-8")
    if isinstance(template, list):   # several named templates: the default one is the chat template
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None:
        return None
    if not isinstance(template, str):
        raise TinyMindError(f"{files['tokenizer_config.json']}: chat_template is not a string")
    specials = {k: _text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    stop = ()
    if files["generation_config.json"].is_file():
        eos = read_json(files["generation_config.json"], "generation_config.json").get("eos_token_id")
        stop = tuple(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    return OwnChat(template, {k: v for k, v in specials.items() if isinstance(v, str)}, stop)


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}``, which transformers' templates may use to mark what the
    assistant says: rendered as its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def compile_template(template: str) -> jinja2.Template:
    """The Jinja environment transformers renders chat templates in (sandboxed, trim_blocks, lstrip_blocks,
    loop controls; tojson without HTML escaping; raise_exception and strftime_now), so that a template
    gives the same text here as in ``AutoTokenizer.apply_chat_template``."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise TinyMindError(f"the model's chat template does not compile ({e})") from None


def render_template(template: jinja2.Template, chat: OwnChat, messages: list[dict],
                    add_generation_prompt: bool) -> str:
    """The template's text for ``messages``: what transformers passes it (messages, tools, documents,
    add_generation_prompt and the special tokens by name)."""
    try:
        return template.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **chat.specials)
    except jinja2.TemplateError as e:   # raise_exception(...) in the template, e.g. roles out of order
        raise TinyMindError(f"the model's chat template refused the conversation: {e}") from None
