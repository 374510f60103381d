"""Chat templates (LLaMA-Factory style): turn messages into (prompt_ids, response_ids) pairs.

A template is a set of format strings with a `{{content}}` slot; `{{bos_token}}` / `{{eos_token}}` are
replaced by the tokenizer's ids (never tokenized as text). Each formatted piece is tokenized on its own
(as LF does), so the prompt / response boundary is exact by construction and masking never guesses.

Difference from LF: the text LF puts after the end-of-turn token (e.g. the "\\n" after `<|im_end|>`) is
emitted as a masked separator at the start of the next turn instead, so every supervised response ends
exactly with the end-of-turn token: the model learns to stop, and nothing after the stop is trained.
The `empty` template also ends responses with eos for the same reason, and so do the templates LF marks
`efficient_eos` (baichuan2): LF leaves eos out of the input between turns and only puts it in the labels;
here every response ends with an eos token in the input too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any

from dataflex.core.errors import ConfigError, DataError
from dataflex.utils.logging import logger

Piece = str | int  # text to tokenize, or a token id
_MARKER = re.compile(r"(\{\{bos_token\}\}|\{\{eos_token\}\})")
_PROMPT_ROLES = ("user", "observation")
_RESPONSE_ROLES = ("assistant", "function")
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "tool": "observation", "function_call": "function"}


class InvalidConversation(DataError):
    """Messages that do not alternate user / assistant (LF drops such rows with a warning)."""


@dataclass(frozen=True)
class Template:
    name: str
    format_user: str = "{{content}}"
    format_assistant: str = "{{content}}{{eos_token}}"
    format_system: str = "{{content}}"
    format_observation: str | None = None  # tool results; default: like a user turn
    format_separator: str = ""  # masked text before every turn but the first
    default_system: str = ""
    add_bos: bool = False
    stop_words: tuple[str, ...] = ()
    use_tokenizer_template: bool = False
    # LF's Llama2Template: the formatted system text is prepended to the first user message's content
    # (inside its `[INST]` / `<start_of_turn>` wrapper) instead of being a turn of its own.
    system_in_user: bool = False
    # LF's ReasoningTemplate (enable_thinking=True, LF's default): a response without a thought block
    # gets an empty one, supervised, so the model learns the thought-block format it must emit.
    thought_words: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if self.system_in_user and _MARKER.search(self.format_system):
            # the system text is spliced into user content as plain text, so it cannot carry token ids
            raise ConfigError(f"template '{self.name}': format_system cannot use bos/eos markers with system_in_user")

    # ---------------------------------------------------------------- public API
    def encode_multiturn(
        self, tokenizer: Any, messages: list[dict[str, str]], system: str | None = None
    ) -> list[tuple[list[int], list[int]]]:
        """(prompt_ids, response_ids) per assistant turn; responses end with the end-of-turn token / eos."""
        return _tokenize_turns(tokenizer, [self.render(tokenizer, messages, system)])[0]

    def encode_prompt(self, tokenizer: Any, messages: list[dict[str, str]], system: str | None = None) -> list[int]:
        """Token ids to generate from: every turn of `messages` (which ends with a user turn) + assistant header."""
        dummy = [*messages, {"role": "assistant", "content": ""}]
        pairs = self.encode_multiturn(tokenizer, dummy, system)
        ids: list[int] = []
        for prompt, response in pairs[:-1]:
            ids += prompt + response
        return ids + pairs[-1][0]

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Ids that end an assistant turn (eos plus single-token stop words), for generation."""
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        words = list(self.stop_words)
        if self.use_tokenizer_template:
            end = self._tokenizer_end_of_turn(tokenizer)
            if end:
                words.append(end)
        for word in words:
            tid = _single_token_id(tokenizer, word)
            if tid is not None and tid not in ids:
                ids.append(tid)
        return ids

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise ConfigError when the tokenizer cannot serve this template; warn on multi-token stop words."""
        needs_eos = any("{{eos_token}}" in f for f in (self.format_user, self.format_assistant, self.format_system))
        if needs_eos and tokenizer.eos_token_id is None:
            raise ConfigError(f"template '{self.name}' needs an eos token but the tokenizer has none; set eos_token")
        if self.use_tokenizer_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "template 'tokenizer' needs tokenizer.chat_template, which this tokenizer lacks; "
                f"pick a named template ({', '.join(n for n in TEMPLATES if n != 'tokenizer')})"
            )
        for word in self.stop_words[:1]:
            if _single_token_id(tokenizer, word) is None:
                logger.warning(
                    "template '%s': end-of-turn %r is not one token for this tokenizer; it will be learned as "
                    "text and generation must stop on the string (add it as a special token)",
                    self.name,
                    word,
                )

    # ---------------------------------------------------------------- export
    def to_jinja(self) -> str | None:
        """This template as a Hugging Face chat template (Jinja), so that `tokenizer.apply_chat_template(messages)`
        renders what training rendered (an exported model keeps its prompt format). Like LLaMA-Factory's export,
        the assistant header is part of the user turn, so `add_generation_prompt` changes nothing. None for the
        `tokenizer` template: training used the tokenizer's own chat template, which then stays as it is; None too when
        no fixed text separates a prompt from its response (`empty`): training tokenised the two apart, and one
        string's tokenisation may merge across them (`5 - 3` + `2` is not `5 - 32`)."""
        if self.use_tokenizer_template:
            return None
        if self.format_user.endswith("{{content}}") and self.format_assistant.startswith("{{content}}"):
            return None
        prompt_roles = _jinja_list(
            ["user", "observation", *(k for k, v in _ROLE_ALIASES.items() if v in _PROMPT_ROLES)]
        )
        observation_roles = _jinja_list(["observation", *(k for k, v in _ROLE_ALIASES.items() if v == "observation")])
        first = ""
        if self.add_bos:
            first += "{%- if bos_token -%}{{ bos_token }}{%- endif -%}"
        if self.system_in_user:
            first += (
                "{%- if ns.system -%}{%- set content = "
                + _jinja_expr(self.format_system, "ns.system")
                + " + content -%}{%- endif -%}"
            )
        else:
            first += "{%- if ns.system -%}{{ " + _jinja_expr(self.format_system, "ns.system") + " }}{%- endif -%}"
        later = "{{ " + _jinja_expr(self.format_separator, "content") + " }}" if self.format_separator else ""
        user = "{{ " + _jinja_expr(self.format_user, "content") + " }}"
        if self.format_observation:
            observation = "{{ " + _jinja_expr(self.format_observation, "content") + " }}"
            user = (
                f"{{%- if message['role'] in {observation_roles} -%}}{observation}{{%- else -%}}{user}{{%- endif -%}}"
            )
        thought = ""
        if self.thought_words:
            opening, closing = (_jinja_literal(w.strip()) for w in self.thought_words)
            empty = _jinja_literal(self.thought_words[0] + self.thought_words[1])
            thought = (
                f"{{%- if {opening} not in content and {closing} not in content -%}}{{{{ {empty} }}}}{{%- endif -%}}"
            )
        return (
            "{%- set ns = namespace(system=" + _jinja_literal(self.default_system) + ") -%}"
            "{%- set loop_messages = messages -%}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set ns.system = messages[0]['content'] or '' -%}{%- set loop_messages = messages[1:] -%}"
            "{%- endif -%}"
            "{%- for message in loop_messages -%}"
            "{%- set content = message['content'] or '' -%}"
            f"{{%- if message['role'] in {prompt_roles} -%}}"
            f"{{%- if loop.first -%}}{first}{{%- else -%}}{later}{{%- endif -%}}"
            f"{user}"
            "{%- else -%}"
            f"{thought}{{{{ {_jinja_expr(self.format_assistant, 'content')} }}}}"
            "{%- endif -%}"
            "{%- endfor -%}"
        )

    # ---------------------------------------------------------------- rendering
    def render(
        self, tokenizer: Any, messages: list[dict[str, str]], system: str | None = None
    ) -> list[tuple[list[Piece], list[Piece]]]:
        """Like `encode_multiturn` but before tokenization: pieces are text or token ids."""
        system, turns = _split_turns(messages, system)
        if system is None:
            system = self.default_system
        if self.use_tokenizer_template:
            return self._render_with_tokenizer(tokenizer, system, turns)
        out: list[tuple[list[Piece], list[Piece]]] = []
        for i, (user, assistant) in enumerate(turns):
            prompt: list[Piece] = []
            content = user["content"]
            if i == 0:
                if self.add_bos and tokenizer.bos_token_id is not None:
                    prompt.append(tokenizer.bos_token_id)
                if system and self.system_in_user:
                    content = self.format_system.replace("{{content}}", system) + content
                elif system:
                    prompt += _fill(self.format_system, system, tokenizer)
            elif self.format_separator:
                prompt.append(self.format_separator)
            fmt = self.format_user
            if user["role"] == "observation" and self.format_observation:
                fmt = self.format_observation
            prompt += _fill(fmt, content, tokenizer)
            response: list[Piece] = []
            if self.thought_words and not _has_thought(assistant["content"], self.thought_words):
                # a piece of its own: LF tokenizes the empty thought separately from the response
                response.append(self.thought_words[0] + self.thought_words[1])
            response += _fill(self.format_assistant, assistant["content"], tokenizer)
            out.append((prompt, response))
        return out

    def _render_with_tokenizer(
        self, tokenizer: Any, system: str, turns: list[tuple[dict[str, str], dict[str, str]]]
    ) -> list[tuple[list[Piece], list[Piece]]]:
        # Render growing prefixes with the tokenizer's own chat template; the text each step adds is the
        # prompt (generation prompt) or the response. Text after the response's end-of-turn (whitespace)
        # moves to the next prompt so the supervised part ends with the end-of-turn token.
        msgs: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        out: list[tuple[list[Piece], list[Piece]]] = []
        done = ""
        for user, assistant in turns:
            role = "tool" if user["role"] == "observation" else "user"
            msgs.append({"role": role, "content": user["content"]})
            gen = _apply_chat_template(tokenizer, msgs, add_generation_prompt=True)
            msgs.append({"role": "assistant", "content": assistant["content"]})
            full = _apply_chat_template(tokenizer, msgs, add_generation_prompt=False)
            if not gen.startswith(done) or not full.startswith(gen):
                raise ConfigError(
                    "the tokenizer's chat_template is not prefix-consistent (earlier turns render differently "
                    "once later turns are added), so prompt/response boundaries are ambiguous; use a named template"
                )
            response = full[len(gen) :]
            tail = len(response) - len(response.rstrip())
            response = response[: len(response) - tail]
            out.append(([gen[len(done) :]], [response]))
            done = full[: len(full) - tail]
        return out

    def _tokenizer_end_of_turn(self, tokenizer: Any) -> str | None:
        probe = "x7q"
        try:
            (_, response), *_ = self._render_with_tokenizer(
                tokenizer, "", [({"role": "user", "content": "hi"}, {"role": "assistant", "content": probe})]
            )
        except Exception:  # a template that cannot render a probe has no detectable end marker
            return None
        text = response[0] if response and isinstance(response[0], str) else ""
        idx = text.find(probe)
        suffix = text[idx + len(probe) :] if idx >= 0 else ""
        return suffix or None


# ------------------------------------------------------------------------- helpers
def _fill(fmt: str, content: str, tokenizer: Any) -> list[Piece]:
    pieces: list[Piece] = []
    for part in _MARKER.split(fmt):
        if part == "{{bos_token}}":
            if tokenizer.bos_token_id is not None:
                pieces.append(tokenizer.bos_token_id)
        elif part == "{{eos_token}}":
            if tokenizer.eos_token_id is None:
                raise ConfigError("the template needs an eos token but the tokenizer has none; set eos_token")
            pieces.append(tokenizer.eos_token_id)
        elif part:
            pieces.append(part.replace("{{content}}", content))
    return pieces


def _jinja_literal(text: str) -> str:
    # A double-quoted Jinja string: the escapes JSON writes (newline, quote, backslash) are ones Jinja's lexer decodes.
    return json.dumps(text, ensure_ascii=False)


def _jinja_list(items: list[str]) -> str:
    return "[" + ", ".join(_jinja_literal(i) for i in dict.fromkeys(items)) + "]"


def _jinja_expr(fmt: str, variable: str) -> str:
    """A format string as a Jinja expression: its text, `variable` for `{{content}}`, the tokenizer's bos / eos
    token text for the markers (the tokenizer maps that text back to the same ids training inserted)."""
    parts: list[str] = []
    for part in _MARKER.split(fmt):
        if part == "{{bos_token}}":
            parts.append("(bos_token or '')")
        elif part == "{{eos_token}}":
            parts.append("eos_token")
        elif part:
            for i, text in enumerate(part.split("{{content}}")):
                if i:
                    parts.append(variable)
                if text:
                    parts.append(_jinja_literal(text))
    return " + ".join(parts) or "''"


def _has_thought(content: str, thought_words: tuple[str, str]) -> bool:
    # LF's test: either tag (stripped of its newlines) present means the response carries its own thought
    return thought_words[0].strip() in content or thought_words[1].strip() in content


def _normalise_role(role: Any) -> str:
    role = str(role)
    return _ROLE_ALIASES.get(role, role)


def _split_turns(
    messages: list[dict[str, str]], system: str | None
) -> tuple[str | None, list[tuple[dict[str, str], dict[str, str]]]]:
    msgs = [{"role": _normalise_role(m.get("role")), "content": m.get("content") or ""} for m in messages]
    if msgs and msgs[0]["role"] == "system":
        system = msgs[0]["content"]
        msgs = msgs[1:]
    if not msgs or len(msgs) % 2:
        raise InvalidConversation(f"expected user/assistant pairs ending with an assistant turn, got {len(msgs)}")
    turns = []
    for i in range(0, len(msgs), 2):
        user, assistant = msgs[i], msgs[i + 1]
        if user["role"] not in _PROMPT_ROLES or assistant["role"] not in _RESPONSE_ROLES:
            raise InvalidConversation(
                f"turn {i // 2}: roles {user['role']!r}, {assistant['role']!r} do not alternate user/assistant"
            )
        turns.append((user, assistant))
    return system, turns


def _apply_chat_template(tokenizer: Any, msgs: list[dict[str, str]], add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):  # some versions return a list for batched input
        text = text[0]
    return text


def _single_token_id(tokenizer: Any, word: str) -> int | None:
    ids = tokenizer.encode(word, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def _tokenize_turns(
    tokenizer: Any, rendered: list[list[tuple[list[Piece], list[Piece]]]], chunk: int = 2048
) -> list[list[tuple[list[int], list[int]]]]:
    """Tokenize every text piece of many rendered conversations in batched tokenizer calls."""
    texts: dict[str, list[int] | None] = {}
    for conv in rendered:
        for prompt, response in conv:
            for p in (*prompt, *response):
                if isinstance(p, str):
                    texts.setdefault(p, None)
    keys = list(texts)
    for start in range(0, len(keys), chunk):
        batch = keys[start : start + chunk]
        for text, ids in zip(batch, tokenizer(batch, add_special_tokens=False)["input_ids"]):
            texts[text] = list(ids)

    def ids_of(pieces: list[Piece]) -> list[int]:
        out: list[int] = []
        for p in pieces:
            out += texts[p] if isinstance(p, str) else [p]  # type: ignore[list-item]
        return out

    return [[(ids_of(p), ids_of(r)) for p, r in conv] for conv in rendered]


# ------------------------------------------------------------------------- registry
TEMPLATES: dict[str, Template] = {}


def register_template(template: Template, *, overwrite: bool = False) -> Template:
    if template.name in TEMPLATES and not overwrite:
        raise ConfigError(f"template '{template.name}' is already registered; pass overwrite=True to replace it")
    TEMPLATES[template.name] = template
    return template


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ConfigError(f"unknown template {name!r}; valid templates: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


register_template(
    Template(
        name="default",
        format_user="Human: {{content}}\nAssistant:",
        format_assistant="{{content}}{{eos_token}}",
        format_system="System: {{content}}\n",
        format_separator="\n",
    )
)
register_template(
    Template(
        name="alpaca",
        format_user="### Instruction:\n{{content}}\n\n### Response:\n",
        format_assistant="{{content}}{{eos_token}}",
        format_separator="\n\n",
        default_system=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
        ),
    )
)
_CHATML = Template(
    name="chatml",
    format_user="<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",
    format_assistant="{{content}}<|im_end|>",
    format_system="<|im_start|>system\n{{content}}<|im_end|>\n",
    format_observation="<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n",
    format_separator="\n",
    stop_words=("<|im_end|>",),
)
register_template(_CHATML)
register_template(
    replace(_CHATML, name="qwen", default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
)
register_template(
    Template(
        name="llama3",
        format_user=(
            "<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        format_assistant="{{content}}<|eot_id|>",
        format_system="<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",
        format_observation=(
            "<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        add_bos=True,
        stop_words=("<|eot_id|>", "<|eom_id|>"),
    )
)
# ---------------------------------------------------------------- more LLaMA-Factory templates
# Formats, default systems and stop words follow LF's `src/llamafactory/data/template.py` (same names);
# only the text after an end-of-turn token moves into `format_separator` (see the module docstring).
_LLAMA2 = register_template(
    Template(
        name="llama2",
        format_user="{{bos_token}}[INST] {{content}} [/INST]",  # LF: bos before every user turn
        format_system="<<SYS>>\n{{content}}\n<</SYS>>\n\n",
        system_in_user=True,
    )
)
register_template(
    replace(_LLAMA2, name="llama2_zh", default_system="You are a helpful assistant. 你是一个乐于助人的助手。")
)
register_template(
    Template(  # LF "mistral" (tokenizer v3); the response keeps LF's leading space
        name="mistral",
        format_user="[INST] {{content}}[/INST]",
        format_assistant=" {{content}}{{eos_token}}",
        format_system="{{content}}\n\n",
        format_observation='[TOOL_RESULTS] {"content": {{content}}}[/TOOL_RESULTS]',
        system_in_user=True,
        add_bos=True,
    )
)
register_template(
    Template(
        name="gemma",
        format_user="<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",
        format_assistant="{{content}}<end_of_turn>",
        format_system="{{content}}\n\n",
        format_observation="<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n",
        format_separator="\n",
        system_in_user=True,
        add_bos=True,
        stop_words=("<end_of_turn>",),
    )
)
register_template(
    Template(
        name="vicuna",
        format_user="USER: {{content}} ASSISTANT:",
        default_system=(
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
    )
)
# LF "qwen3" is a ReasoningTemplate; this is its default (enable_thinking=True) training behaviour. Not ported:
# enable_thinking=False / "qwen3_nothink", and LF's encode_oneturn stripping thoughts from history turns.
register_template(
    replace(
        _CHATML,
        name="qwen3",
        format_observation=(
            "<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
        ),
        thought_words=("<think>\n", "\n</think>\n\n"),
    )
)
register_template(
    Template(  # LF "deepseek" (DeepSeek LLM chat)
        name="deepseek",
        format_user="User: {{content}}\n\nAssistant:",
        format_system="{{content}}\n\n",
        add_bos=True,
    )
)
register_template(replace(_CHATML, name="yi", format_observation=None))  # LF: observations use the user format
register_template(
    Template(  # LF "phi" (Phi-3)
        name="phi",
        format_user="<|user|>\n{{content}}<|end|>\n<|assistant|>\n",
        format_assistant="{{content}}<|end|>",
        format_system="<|system|>\n{{content}}<|end|>\n",
        format_separator="\n",
        stop_words=("<|end|>",),
    )
)
register_template(
    # LF marks it efficient_eos; here the response ends with eos in the input too (module docstring)
    Template(name="baichuan2", format_user="<reserved_106>{{content}}<reserved_107>")
)
register_template(
    replace(
        _CHATML,
        name="intern2",
        format_observation=None,
        add_bos=True,
        default_system=(
            "You are an AI assistant whose name is InternLM (书生·浦语).\n"
            "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
            "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
            "- InternLM (书生·浦语) can understand and communicate fluently in the language "
            "chosen by the user such as English and 中文."
        ),
    )
)
register_template(
    Template(
        name="cohere",
        format_user=(
            "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{{content}}<|END_OF_TURN_TOKEN|>"
            "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
        ),
        format_system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{{content}}<|END_OF_TURN_TOKEN|>",
        add_bos=True,
    )
)
register_template(
    Template(
        name="llama4",
        format_user=(
            "<|header_start|>user<|header_end|>\n\n{{content}}<|eot|><|header_start|>assistant<|header_end|>\n\n"
        ),
        format_assistant="{{content}}<|eot|>",
        format_system="<|header_start|>system<|header_end|>\n\n{{content}}<|eot|>",
        format_observation=(
            "<|header_start|>ipython<|header_end|>\n\n{{content}}<|eot|><|header_start|>assistant<|header_end|>\n\n"
        ),
        add_bos=True,
        stop_words=("<|eot|>", "<|eom|>"),
    )
)
# Not ported: chatglm3 (LF addresses "[gMASK]", "sop", "<|user|>" as token names rather than text, relies on a
# remote-code tokenizer, and ends a turn by emitting "<|user|>", which the end-of-turn rule here cannot express).

register_template(Template(name="empty"))
register_template(Template(name="tokenizer", use_tokenizer_template=True))
