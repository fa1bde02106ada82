"""The chat template a model was fine-tuned with, stored as ``chat_template.json`` next to ``tokenizer.json``.

SFT (``lmforge/data/tasks.py``) formats a conversation as, per message, ``role header + content`` followed
by the end-of-turn string (user/system) or the EOS token (assistant); generation starts after the
assistant header. ``export_sft`` writes that layout here so the server rebuilds *exactly* the token ids
training saw (each segment tokenized separately, as ``tasks.chat_prompt`` does). A model folder without the
file has no chat template and ``/v1/chat/completions`` answers 400.

File format (``format`` = "lmforge-chat/1")::

    {"format": "lmforge-chat/1", "roles": {"system": "...", "user": "...", "assistant": "..."},
     "end_of_turn": "\\n", "assistant_end": "eos"}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from lmforge.errors import ConfigError

TEMPLATE_FILE = "chat_template.json"
FORMAT = "lmforge-chat/1"


class ChatTemplate:
    def __init__(self, roles: dict[str, str], end_of_turn: str, assistant_end: str = "eos"):
        self.roles, self.end_of_turn, self.assistant_end = dict(roles), end_of_turn, assistant_end

    def to_dict(self) -> dict:
        return {"format": FORMAT, "roles": self.roles, "end_of_turn": self.end_of_turn,
                "assistant_end": self.assistant_end}

    def encode(self, tokenizer, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` followed by the assistant header (roles already validated)."""
        ids: list[int] = []
        for m in messages:
            ids += tokenizer.encode(self.roles[m["role"]]) + tokenizer.encode(m["content"])
            if m["role"] == "assistant" and self.assistant_end == "eos" and tokenizer.eos_id is not None:
                ids.append(tokenizer.eos_id)
            else:
                ids += tokenizer.encode(self.end_of_turn)
        return ids + tokenizer.encode(self.roles["assistant"])


def sft_template() -> ChatTemplate:
    """The layout ``lmforge.data.tasks`` trains with."""
    from lmforge.data.tasks import END_OF_TURN, ROLE_HEADERS

    return ChatTemplate(ROLE_HEADERS, END_OF_TURN, "eos")


def save_chat_template(folder: str | Path, template: Optional[ChatTemplate] = None) -> Path:
    path = Path(folder) / TEMPLATE_FILE
    path.write_text(json.dumps((template or sft_template()).to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def load_chat_template(folder: str | Path) -> Optional[ChatTemplate]:
    """The folder's template, or None when it has none; a malformed file is a ConfigError naming it."""
    path = Path(folder) / TEMPLATE_FILE
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ConfigError(f"{path}: 'format' must be {FORMAT!r}, got {d.get('format') if isinstance(d, dict) else d!r}")
    roles = d.get("roles")
    if not isinstance(roles, dict) or not all(isinstance(roles.get(r), str) for r in ("system", "user", "assistant")):
        raise ConfigError(f"{path}: 'roles' must map system, user and assistant to header strings")
    eot, end = d.get("end_of_turn", "\n"), d.get("assistant_end", "eos")
    if not isinstance(eot, str) or end not in ("eos", "end_of_turn"):
        raise ConfigError(f"{path}: 'end_of_turn' must be a string and 'assistant_end' 'eos' or 'end_of_turn'")
    return ChatTemplate(roles, eot, end)
