"""The chat formats teams hold, converted to the messages format phi3ops trains on.

    phi3ops data add sharegpt.jsonl                      # detected: sharegpt
    phi3ops data add alpaca.json --format alpaca         # a JSON array of instruction records
    phi3ops data add chats.jsonl --role-map bot=assistant

- messages: `{"messages": [{"role": "user", "content": ...}, ...]}`, as phi3ops stores it.
- openai: OpenAI's chat fine-tuning file: messages whose turns may carry `name` (dropped) and,
  on assistant turns, `weight` 1 (dropped: the default). A `weight: 0` turn is refused, named:
  phi3ops trains on every assistant turn of a conversation.
- sharegpt: `{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}],
  "system": ...}`; roles human/user, gpt/assistant/model/chatgpt, system; others by --role-map.
- alpaca: `{"instruction", "input", "output"}` (and `system`): the user turn is the instruction,
  followed by the input when there is one.

Tool calls and function results are refused with a reason that says so: phi3ops trains plain
chat. A record that cannot be converted is kept as it was, so that validation and preprocessing
quarantine it with its file and line; nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from phi3ops.errors import InvalidDataError

FORMATS = ("messages", "openai", "sharegpt", "alpaca")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bard": "assistant",
                  "system": "system"}
TOOL_ROLES = {"tool", "function", "function_call", "observation", "ipython"}
TOOL_KEYS = {"tool_calls", "function_call", "tool_call_id"}


class ConversionError(ValueError):
    """A record that cannot be converted: `rule` names why, as validation's rules do."""

    def __init__(self, rule: str, detail: str):
        super().__init__(f"{rule}: {detail}")
        self.rule, self.detail = rule, detail


def parse_role_map(pairs: list[str] | None) -> dict[str, str]:
    """`--role-map bot=assistant --role-map customer=user` as a mapping (names lowercased)."""
    found = {}
    for pair in pairs or []:
        name, _, role = pair.partition("=")
        if not name or role not in ("user", "assistant", "system"):
            raise InvalidDataError(f"--role-map {pair!r}: give NAME=user, NAME=assistant or "
                                   "NAME=system")
        found[name.strip().lower()] = role
    return found


def detect(record: object) -> str | None:
    """The format of one record, or None when it is none of them."""
    if not isinstance(record, Mapping):
        return None
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    messages = record.get("messages")
    if isinstance(messages, list):
        extra = any(isinstance(m, Mapping) and set(m) - {"role", "content"} for m in messages)
        return "openai" if extra or set(record) - {"messages"} else "messages"
    return None


def convert(record: Mapping, fmt: str, role_map: Mapping[str, str] | None = None) -> dict:
    """One record of `fmt` as `{"messages": [...]}`; ConversionError names what stops it."""
    if not isinstance(record, Mapping):
        raise ConversionError("not_an_object", f"a {type(record).__name__}, not a JSON object")
    if fmt == "messages":
        return {"messages": record.get("messages")}
    if fmt == "openai":
        return {"messages": _openai(record)}
    if fmt == "sharegpt":
        return {"messages": _sharegpt(record, {**SHAREGPT_ROLES, **(role_map or {})})}
    if fmt == "alpaca":
        return {"messages": _alpaca(record)}
    raise InvalidDataError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")


def _openai(record: Mapping) -> list[dict]:
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise ConversionError("bad_messages", "'messages' must be a list")
    out = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, Mapping):
            raise ConversionError("bad_message", f"messages[{i}] is not an object")
        if turn.get("role") in TOOL_ROLES or TOOL_KEYS & set(turn):
            raise ConversionError("tool_turn", f"messages[{i}] is a tool call or result; phi3ops "
                                  "trains plain chat: leave tool conversations out")
        if turn.get("weight", 1) == 0:
            raise ConversionError("weight_zero", f"messages[{i}] has weight 0; phi3ops trains on "
                                  "every assistant turn: drop the turn (and what follows) or set "
                                  "its weight to 1")
        out.append({"role": turn.get("role"), "content": _text(turn.get("content"), i)})
    return out


def _text(content: object, i: int) -> object:
    """OpenAI's content parts (`[{"type": "text", "text": ...}]`) joined; a string as it is."""
    if not isinstance(content, list):
        return content
    if not all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        raise ConversionError("not_text", f"messages[{i}] holds non-text parts (images, audio); "
                              "phi3ops trains on text")
    return "".join(str(p.get("text", "")) for p in content)


def _sharegpt(record: Mapping, roles: Mapping[str, str]) -> list[dict]:
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise ConversionError("bad_conversations", "'conversations' must be a list")
    out = []
    if isinstance(record.get("system"), str) and record["system"].strip():
        out.append({"role": "system", "content": record["system"]})
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise ConversionError("bad_message", f"conversations[{i}] is not an object")
        name = turn.get("from", turn.get("role"))
        if str(name).lower() in TOOL_ROLES:
            raise ConversionError("tool_turn", f"conversations[{i}] is from {name!r}, a tool "
                                  "call or result; phi3ops trains plain chat")
        role = roles.get(str(name).lower())
        if role is None:
            raise ConversionError("unknown_role", f"conversations[{i}] is from {name!r}; map it "
                                  f"with --role-map {name}=user|assistant|system")
        out.append({"role": role, "content": turn.get("value", turn.get("content"))})
    return out


def _alpaca(record: Mapping) -> list[dict]:
    instruction, extra = record.get("instruction"), record.get("input")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ConversionError("empty_instruction", "'instruction' is missing or empty")
    user = instruction if not (isinstance(extra, str) and extra.strip()) \
        else f"{instruction}\n\n{extra}"
    out = [{"role": "system", "content": record["system"]}] \
        if isinstance(record.get("system"), str) and record["system"].strip() else []
    return [*out, {"role": "user", "content": user},
            {"role": "assistant", "content": record.get("output")}]


def foreign(path: Path) -> str | None:
    """Why a file given as messages JSONL is not: a JSON array, or records of another format
    (from its first line), as one sentence that names the command that reads it; None when
    its first record is in the messages format, or in none that phi3ops knows."""
    with path.open("rb") as f:
        head = f.read(1 << 16).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if head.startswith("["):
        return (f"{path} is a JSON array, not JSON lines: `phi3ops data add {path}` reads it "
                "(the format detected from its first record)")
    try:
        found = detect(json.loads(head.splitlines()[0])) if head else None
    except ValueError:
        return None
    if found in (None, "messages"):
        return None
    return (f"{path} holds {found} records (detected from its first line), not phi3ops' "
            f"messages format: `phi3ops data add {path}` converts it (or --format {found})")
