"""Phi-3's chat templates: recognised by their Jinja tokens, each with a training twin.

    phi3ops run       # the preflight picks the training template before any stage runs

Loss on assistant turns only needs `{% generation %}` markers around what the model must learn to
say, and no released Phi-3 template has them. For each one phi3ops knows (the hub's current
template, the one Phi-3-mini shipped in April 2024 and many GGUF files still carry, Phi-3.5's), the
training twin renders the same text, token for token, with the markers around each reply and its
closing <|end|>. A template copied with other whitespace between Jinja tokens is the same template.
Any other template without markers stops the run before it starts, naming the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import jinja2

from phi3ops.errors import ConfigError, TemplateError

# microsoft/Phi-3-mini-4k-instruct's tokenizer_config.json since July 2024.
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI3_TRAINING = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n'}}{% generation %}{{message['content'] + '<|end|>'}}{% endgeneration %}"
    "{{'\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Phi-3-mini's first release: <s> first, no system turns (dropped without a word), and the
# assistant header written after every user turn, whether a reply follows or not.
PHI3_2024_04_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}"
    "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
    "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}"
    "{% endif %}{% endfor %}"
)
PHI3_2024_04_TRAINING = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}"
    "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
    "{% elif (message['role'] == 'assistant') %}{% generation %}"
    "{{message['content'] + '<|end|>'}}{% endgeneration %}{{'\n'}}{% endif %}{% endfor %}"
)
# Phi-3.5-mini: the current template, except that an empty system turn renders nothing.
PHI3_5_TEMPLATE = PHI3_TEMPLATE.replace(
    "message['role'] == 'system' %}", "message['role'] == 'system' and message['content'] %}")
PHI3_5_TRAINING = PHI3_TRAINING.replace(
    "message['role'] == 'system' %}", "message['role'] == 'system' and message['content'] %}")


@dataclass(frozen=True)
class KnownTemplate:
    name: str
    description: str
    original: str
    training: str
    drops_system: bool = False


KNOWN = (
    KnownTemplate("phi3", "Phi-3's current template (hub)", PHI3_TEMPLATE, PHI3_TRAINING),
    KnownTemplate("phi3-2024-04", "Phi-3-mini's April 2024 template", PHI3_2024_04_TEMPLATE,
                  PHI3_2024_04_TRAINING, drops_system=True),
    KnownTemplate("phi3.5", "Phi-3.5-mini's template", PHI3_5_TEMPLATE, PHI3_5_TRAINING),
)
BY_NAME = {t.name: t for t in KNOWN}
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
# HF renders chat templates with trim_blocks and lstrip_blocks; lexing with the same settings
# makes "differs only in whitespace" mean "renders the same text".
_JINJA = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)


def jinja_tokens(template: str) -> tuple[tuple[str, str], ...]:
    """The template's Jinja tokens: literal text as rendered (the lexer applies the whitespace
    control), tag delimiters bare, whitespace inside tags and comments left out."""
    try:
        tokens = list(_JINJA.lex(template))
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"the chat template is not valid Jinja: {e}") from None
    return tuple((kind, value.strip(" \t\n-+") if kind.endswith(("_begin", "_end")) else value)
                 for _, kind, value in tokens
                 if kind != "whitespace" and not kind.startswith("comment"))


_KNOWN_TOKENS = {jinja_tokens(t.original): t for t in KNOWN} | {
    jinja_tokens(t.training): t for t in KNOWN}


def recognise(template: str | None) -> KnownTemplate | None:
    """The known template this one is (the original or its training twin), else None."""
    return _KNOWN_TOKENS.get(jinja_tokens(template)) if template else None


def has_generation_markers(template: str | None) -> bool:
    return bool(template and _GENERATION.search(template))


def resolve_setting(value: str | None, root: Path) -> str | None:
    """`model.chat_template` as template text: a known name, a .jinja file, or Jinja itself."""
    if value is None:
        return None
    if value in BY_NAME:
        return BY_NAME[value].original
    if value.endswith(".jinja") and "{" not in value:
        path = Path(value) if Path(value).is_absolute() else root / value
        if not path.is_file():
            raise ConfigError(f"model.chat_template: {path} not found")
        return path.read_text(encoding="utf-8")
    if "{{" not in value and "{%" not in value:
        raise ConfigError(f"model.chat_template: '{value}' is neither a known template "
                          f"({', '.join(BY_NAME)}), a .jinja file, nor a Jinja template")
    return value


@dataclass(frozen=True)
class TemplatePlan:
    """Which template renders training data, and what the user should know about it."""

    name: str  # a known template's name, "own (with generation markers)", or "own"
    training: str | None  # None: the loss covers every token, so the tokenizer's own serves
    drops_system: bool = False

    def system_note(self, n_with_system: int, n_conversations: int) -> str | None:
        if not self.drops_system or not n_with_system:
            return None
        return (f"the chat template ({self.name}) drops system turns: {n_with_system} of "
                f"{n_conversations} conversations have one, and the model never sees it. Set "
                "model.chat_template: phi3 to render them, if your base model was trained so.")


def plan_training_template(template: str | None, assistant_only_loss: bool) -> TemplatePlan:
    """Pick the training template for the tokenizer's template, or stop with the fix."""
    known = recognise(template)
    if known is not None:
        return TemplatePlan(known.name, known.training, known.drops_system)
    if has_generation_markers(template):
        return TemplatePlan("own (with generation markers)", template)
    if not assistant_only_loss:
        return TemplatePlan("own", None)
    what = "has no chat template" if not template else "has a chat template phi3ops does not know"
    raise TemplateError(
        f"the tokenizer {what}, and training_config.assistant_only_loss needs "
        "{% generation %} markers around assistant replies to find them. Fix: set "
        f"model.chat_template to one of {', '.join(BY_NAME)} if your model speaks that format, "
        "or to a .jinja file whose assistant replies sit inside {% generation %}...{% "
        "endgeneration %}; or set training_config.assistant_only_loss: false to train on every "
        "token.")
