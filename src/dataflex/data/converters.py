"""Raw rows -> `(messages, system)` (sft) or text (pt), following LF's convert_alpaca / convert_sharegpt."""

from __future__ import annotations

from typing import Any

from dataflex.core.errors import DataError
from dataflex.data.dataset_info import DatasetAttr

_MISSING = object()


def _get(row: dict[str, Any], column: str, role: str, attr: DatasetAttr, index: int) -> Any:
    value = row.get(column, _MISSING)
    if value is _MISSING or value is None:
        hint = ' (for pt text map it: "columns": {"prompt": "text"})' if role == "prompt" else ""
        raise DataError(
            f"dataset '{attr.name}': row {index} has no column {column!r} (mapped as {role}); "
            f"fix the row or the columns mapping in dataset_info.json{hint}"
        )
    return value


def _text(value: Any, column: str, attr: DatasetAttr, index: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # numeric answers in user files are common
    raise DataError(f"dataset '{attr.name}': row {index} column {column!r} is a {type(value).__name__}, expected text")


def alpaca_to_messages(row: dict[str, Any], attr: DatasetAttr, index: int) -> tuple[list[dict[str, str]], str | None]:
    messages: list[dict[str, str]] = []
    if attr.history and row.get(attr.history):
        history = row[attr.history]
        if not isinstance(history, list) or not all(isinstance(h, list | tuple) and len(h) == 2 for h in history):
            raise DataError(
                f"dataset '{attr.name}': row {index} column {attr.history!r} must be a list of [query, answer] pairs"
            )
        for q, a in history:
            messages.append({"role": "user", "content": _text(q, attr.history, attr, index)})
            messages.append({"role": "assistant", "content": _text(a, attr.history, attr, index)})
    parts = []
    if attr.prompt:
        prompt = _get(row, attr.prompt, "prompt", attr, index)
        if prompt != "":
            parts.append(_text(prompt, attr.prompt, attr, index))
    if attr.query and row.get(attr.query) not in (None, ""):
        parts.append(_text(row[attr.query], attr.query, attr, index))
    messages.append({"role": "user", "content": "\n".join(parts)})
    if not attr.response:
        raise DataError(f"dataset '{attr.name}': no response column mapped; set columns.response in dataset_info.json")
    response = _get(row, attr.response, "response", attr, index)
    messages.append({"role": "assistant", "content": _text(response, attr.response, attr, index)})
    system = _system(row, attr, index)
    return messages, system


def _system(row: dict[str, Any], attr: DatasetAttr, index: int) -> str | None:
    if attr.system and row.get(attr.system) not in (None, ""):
        return _text(row[attr.system], attr.system, attr, index)
    return None


def sharegpt_to_messages(row: dict[str, Any], attr: DatasetAttr, index: int) -> tuple[list[dict[str, str]], str | None]:
    column = attr.messages or "conversations"
    raw = _get(row, column, "messages", attr, index)
    if not isinstance(raw, list):
        raise DataError(f"dataset '{attr.name}': row {index} column {column!r} must be a list of messages")
    roles = {
        attr.user_tag: "user",
        attr.assistant_tag: "assistant",
        attr.observation_tag: "observation",
        attr.function_tag: "function",
        attr.system_tag: "system",
    }
    messages = []
    for j, msg in enumerate(raw):
        if not isinstance(msg, dict) or attr.role_tag not in msg or attr.content_tag not in msg:
            raise DataError(
                f"dataset '{attr.name}': row {index} message {j} lacks '{attr.role_tag}'/'{attr.content_tag}'; "
                "set tags.role_tag / tags.content_tag in dataset_info.json (OpenAI style: role / content)"
            )
        tag = msg[attr.role_tag]
        if tag not in roles:
            raise DataError(
                f"dataset '{attr.name}': row {index} message {j} has role {tag!r}, not one of "
                f"{sorted(str(r) for r in roles)}; set tags.user_tag / assistant_tag in dataset_info.json"
            )
        messages.append({"role": roles[tag], "content": _text(msg[attr.content_tag], attr.content_tag, attr, index)})
    system = None
    if messages and messages[0]["role"] == "system":
        system = messages.pop(0)["content"]
    else:
        system = _system(row, attr, index)
    return messages, system


def row_to_messages(row: dict[str, Any], attr: DatasetAttr, index: int) -> tuple[list[dict[str, str]], str | None]:
    if attr.formatting == "sharegpt":
        return sharegpt_to_messages(row, attr, index)
    return alpaca_to_messages(row, attr, index)


def row_to_text(row: dict[str, Any], attr: DatasetAttr, index: int) -> str:
    """Pre-training text: the prompt column (+ query, as LF builds the first user message)."""
    if attr.formatting == "sharegpt":
        messages, system = sharegpt_to_messages(row, attr, index)
        return "\n".join(([system] if system else []) + [m["content"] for m in messages])
    if not attr.prompt:
        raise DataError(f'dataset \'{attr.name}\': pt needs the text column mapped: "columns": {{"prompt": "text"}}')
    parts = [_text(_get(row, attr.prompt, "prompt", attr, index), attr.prompt, attr, index)]
    if attr.query and row.get(attr.query) not in (None, ""):
        parts.append(_text(row[attr.query], attr.query, attr, index))
    return "\n".join(p for p in parts if p)
