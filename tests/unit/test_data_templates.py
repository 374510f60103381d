"""Templates: exact prompt/response masking for every template, multi-turn, tokenizer chat templates."""

from __future__ import annotations

import copy
import functools

import pytest

from dataflex.core.errors import ConfigError
from dataflex.data import IGNORE_INDEX, TEMPLATES, Template, build_dataset, get_template

try:
    from tests.unit.test_data_fixtures import one_dataset, tiny_tokenizer
except ImportError:  # tests/unit is not a package: pytest puts it on sys.path
    from test_data_fixtures import one_dataset, tiny_tokenizer

ROW = {"instruction": "Sort the numbers in ascending order.", "input": "7 3 9", "output": "3 7 9"}
END = {
    "default": "</s>",
    "alpaca": "</s>",
    "chatml": "<|im_end|>",
    "qwen": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "empty": "</s>",
    "tokenizer": "<|im_end|>",
}
PROMPT = {
    "default": "Human: Sort the numbers in ascending order.\n7 3 9\nAssistant:",
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nSort the numbers in ascending order.\n7 3 9\n\n### Response:\n",
    "chatml": "<|im_start|>user\nSort the numbers in ascending order.\n7 3 9<|im_end|>\n<|im_start|>assistant\n",
    "qwen": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nSort the numbers in ascending order.\n7 3 9<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>user<|end_header_id|>\n\nSort the numbers in ascending order.\n7 3 9<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "empty": "Sort the numbers in ascending order.\n7 3 9",
    "tokenizer": "<|im_start|>user\nSort the numbers in ascending order.\n7 3 9<|im_end|>\n<|im_start|>assistant\n",
}
CONV = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Add.\n2 + 2"},
        {"from": "gpt", "value": "4"},
        {"from": "human", "value": "Reverse.\na b c"},
        {"from": "gpt", "value": "c b a"},
    ]
}


def _spans(labels):
    """Contiguous runs of supervised positions as (start, end)."""
    spans, start = [], None
    for i, x in enumerate([*labels, IGNORE_INDEX]):
        if x != IGNORE_INDEX and start is None:
            start = i
        elif x == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_registry_has_required_templates():
    assert {"default", "alpaca", "chatml", "qwen", "llama3", "empty", "tokenizer"} <= set(TEMPLATES)
    with pytest.raises(ConfigError, match=r"unknown template 'vicuna9'; valid templates: .*chatml"):
        get_template("vicuna9")


@pytest.mark.parametrize("name", sorted(END))
def test_single_turn_masking_is_exact(tmp_path, name):
    tok = tiny_tokenizer()
    d = one_dataset(tmp_path, [ROW])
    ex = build_dataset(dataset="ds", dataset_dir=d, tokenizer=tok, template=name, cutoff_len=256)[0]
    ids, labels = ex["input_ids"], ex["labels"]
    ((start, end),) = _spans(labels)
    assert end == len(ids)
    assert all(x == IGNORE_INDEX for x in labels[:start])
    assert labels[start:] == ids[start:]
    assert tok.decode(ids[start:]) == ROW["output"] + END[name]
    assert tok.decode(ids[:start]) == PROMPT[name]
    # The response ends with one end-of-turn token that generation stops on.
    assert ids[-1] in get_template(name).stop_token_ids(tok)


@pytest.mark.parametrize("name", ["default", "chatml", "llama3"])
def test_train_on_prompt_supervises_everything(tmp_path, name):
    d = one_dataset(tmp_path, [ROW])
    ex = build_dataset(dataset="ds", dataset_dir=d, tokenizer=tiny_tokenizer(), template=name, train_on_prompt=True)[0]
    assert ex["labels"] == ex["input_ids"]


@pytest.mark.parametrize("name", ["default", "chatml", "llama3", "tokenizer"])
def test_multi_turn_supervises_each_assistant_turn(tmp_path, name):
    tok = tiny_tokenizer()
    d = one_dataset(tmp_path, [CONV], formatting="sharegpt")
    ex = build_dataset(dataset="ds", dataset_dir=d, tokenizer=tok, template=name)[0]
    ids, labels = ex["input_ids"], ex["labels"]
    spans = _spans(labels)
    assert [tok.decode(ids[a:b]) for a, b in spans] == ["4" + END[name], "c b a" + END[name]]
    masked = tok.decode([t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    for text in ("Be brief.", "Add.\n2 + 2", "Reverse.\na b c"):
        assert text in masked
    assert "Be brief." not in tok.decode(ids[spans[0][0] :])


def test_tokenizer_template_matches_named_chatml(tmp_path):
    tok = tiny_tokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}] * 2
    named = get_template("chatml").encode_multiturn(tok, messages, system="S")
    native = get_template("tokenizer").encode_multiturn(tok, messages, system="S")
    assert [tuple(map(tok.decode, p)) for p in named] == [tuple(map(tok.decode, p)) for p in native]
    # The rendered text equals the tokenizer's own chat template (up to the trailing newline after the end).
    full = tok.decode([t for p, r in native for t in p + r])
    msgs = [{"role": "system", "content": "S"}, *messages]
    assert full + "\n" == tok.apply_chat_template(msgs, tokenize=False)


def test_encode_prompt_is_the_training_prompt():
    tok = tiny_tokenizer()
    messages = [
        {"role": "user", "content": "Add.\n2 + 2"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Add.\n3 + 3"},
        {"role": "assistant", "content": "6"},
    ]
    for name in ("default", "chatml", "tokenizer", "llama2", "gemma", "qwen3"):
        t = get_template(name)
        pairs = t.encode_multiturn(tok, messages)
        assert t.encode_prompt(tok, messages[:-1]) == pairs[0][0] + pairs[0][1] + pairs[1][0]


def test_tokenizer_template_errors(tmp_path):
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = None
    with pytest.raises(ConfigError, match="lacks"):
        get_template("tokenizer").check_tokenizer(tok)
    tok.chat_template = "{{ messages[-1]['content'] }}"  # renders only the last message
    messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(ConfigError, match="not prefix-consistent"):
        get_template("tokenizer").encode_multiturn(tok, messages)


def test_system_column_and_default_system(tmp_path):
    tok = tiny_tokenizer()
    rows = [{**ROW, "sys": "Answer in digits."}, ROW]
    d = one_dataset(tmp_path, rows, columns={"system": "sys"})
    ds = build_dataset(dataset="ds", dataset_dir=d, tokenizer=tok, template="qwen")
    assert "Answer in digits." in tok.decode(ds[0]["input_ids"]) and "Qwen" not in tok.decode(ds[0]["input_ids"])
    assert "You are Qwen" in tok.decode(ds[1]["input_ids"])


def test_alpaca_history_and_openai_style_sharegpt_are_multi_turn(tmp_path):
    tok = tiny_tokenizer()
    hist = {"instruction": "Reverse.", "input": "a b c", "output": "c b a", "history": [["Add.\n2 + 2", "4"]]}
    d = one_dataset(tmp_path / "a", [hist], columns={"history": "history"})
    openai = {
        "messages": [
            {"role": "user", "content": "Add.\n2 + 2"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "Reverse.\na b c"},
            {"role": "assistant", "content": "c b a"},
        ]
    }
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    d2 = one_dataset(tmp_path / "b", [openai], formatting="sharegpt", columns={"messages": "messages"}, tags=tags)
    a = build_dataset(dataset="ds", dataset_dir=d, tokenizer=tok, template="chatml")[0]
    b = build_dataset(dataset="ds", dataset_dir=d2, tokenizer=tok, template="chatml")[0]
    assert a == b
    assert [tok.decode(a["input_ids"][s:e]) for s, e in _spans(a["labels"])] == ["4<|im_end|>", "c b a<|im_end|>"]


# ------------------------------------------------------------------ LLaMA-Factory templates ported from LF
TWO_TURNS = [
    {"role": "user", "content": "Add.\n2 + 2"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "Reverse.\na b c"},
    {"role": "assistant", "content": "c b a"},
]
_CHATML_P0 = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd.\n2 + 2<|im_end|>\n<|im_start|>assistant\n"
_CHATML_P1 = "\n<|im_start|>user\nReverse.\na b c<|im_end|>\n<|im_start|>assistant\n"
_COHERE_USER = "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{}<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
_LLAMA4_USER = "<|header_start|>user<|header_end|>\n\n{}<|eot|><|header_start|>assistant<|header_end|>\n\n"
_THINK = "<think>\n\n</think>\n\n"
# LF's rendering of CONV / TWO_TURNS with system "Be brief." as (prompt, response, prompt, response). As documented
# in templates.py, text LF puts after an end-of-turn token opens the next prompt, and baichuan2 (LF efficient_eos)
# ends each response with eos.
RENDERED = {
    "llama2": (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nAdd.\n2 + 2 [/INST]",
        "4</s>",
        "<s>[INST] Reverse.\na b c [/INST]",
        "c b a</s>",
    ),
    "llama2_zh": (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nAdd.\n2 + 2 [/INST]",
        "4</s>",
        "<s>[INST] Reverse.\na b c [/INST]",
        "c b a</s>",
    ),
    "mistral": ("<s>[INST] Be brief.\n\nAdd.\n2 + 2[/INST]", " 4</s>", "[INST] Reverse.\na b c[/INST]", " c b a</s>"),
    "gemma": (
        "<s><start_of_turn>user\nBe brief.\n\nAdd.\n2 + 2<end_of_turn>\n<start_of_turn>model\n",
        "4<end_of_turn>",
        "\n<start_of_turn>user\nReverse.\na b c<end_of_turn>\n<start_of_turn>model\n",
        "c b a<end_of_turn>",
    ),
    "vicuna": ("Be brief.USER: Add.\n2 + 2 ASSISTANT:", "4</s>", "USER: Reverse.\na b c ASSISTANT:", "c b a</s>"),
    "qwen3": (_CHATML_P0, _THINK + "4<|im_end|>", _CHATML_P1, _THINK + "c b a<|im_end|>"),
    "deepseek": (
        "<s>Be brief.\n\nUser: Add.\n2 + 2\n\nAssistant:",
        "4</s>",
        "User: Reverse.\na b c\n\nAssistant:",
        "c b a</s>",
    ),
    "yi": (_CHATML_P0, "4<|im_end|>", _CHATML_P1, "c b a<|im_end|>"),
    "phi": (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nAdd.\n2 + 2<|end|>\n<|assistant|>\n",
        "4<|end|>",
        "\n<|user|>\nReverse.\na b c<|end|>\n<|assistant|>\n",
        "c b a<|end|>",
    ),
    "baichuan2": (
        "Be brief.<reserved_106>Add.\n2 + 2<reserved_107>",
        "4</s>",
        "<reserved_106>Reverse.\na b c<reserved_107>",
        "c b a</s>",
    ),
    "intern2": ("<s>" + _CHATML_P0, "4<|im_end|>", _CHATML_P1, "c b a<|im_end|>"),
    "cohere": (
        "<s><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be brief.<|END_OF_TURN_TOKEN|>" + _COHERE_USER.format("Add.\n2 + 2"),
        "4</s>",
        _COHERE_USER.format("Reverse.\na b c"),
        "c b a</s>",
    ),
    "llama4": (
        "<s><|header_start|>system<|header_end|>\n\nBe brief.<|eot|>" + _LLAMA4_USER.format("Add.\n2 + 2"),
        "4<|eot|>",
        _LLAMA4_USER.format("Reverse.\na b c"),
        "c b a<|eot|>",
    ),
}
# LF's default systems, copied from LF's template.py.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
INTERN_SYSTEM = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language "
    "chosen by the user such as English and 中文."
)
# The first prompt when no system is given: the default system (if any) takes the system's place.
FIRST_PROMPT_NO_SYSTEM = {
    "llama2": "<s>[INST] Add.\n2 + 2 [/INST]",
    "llama2_zh": "<s>[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n"
    "Add.\n2 + 2 [/INST]",
    "mistral": "<s>[INST] Add.\n2 + 2[/INST]",
    "gemma": "<s><start_of_turn>user\nAdd.\n2 + 2<end_of_turn>\n<start_of_turn>model\n",
    "vicuna": VICUNA_SYSTEM + "USER: Add.\n2 + 2 ASSISTANT:",
    "qwen3": "<|im_start|>user\nAdd.\n2 + 2<|im_end|>\n<|im_start|>assistant\n",
    "deepseek": "<s>User: Add.\n2 + 2\n\nAssistant:",
    "yi": "<|im_start|>user\nAdd.\n2 + 2<|im_end|>\n<|im_start|>assistant\n",
    "phi": "<|user|>\nAdd.\n2 + 2<|end|>\n<|assistant|>\n",
    "baichuan2": "<reserved_106>Add.\n2 + 2<reserved_107>",
    "intern2": f"<s><|im_start|>system\n{INTERN_SYSTEM}<|im_end|>\n<|im_start|>user\nAdd.\n2 + 2<|im_end|>\n"
    "<|im_start|>assistant\n",
    "cohere": "<s>" + _COHERE_USER.format("Add.\n2 + 2"),
    "llama4": "<s>" + _LLAMA4_USER.format("Add.\n2 + 2"),
}
# Markers real tokenizers of these models hold as single tokens (the fixture tokenizer spells them as text).
MODEL_SPECIALS = [
    "[INST]",
    "[/INST]",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<think>",
    "</think>",
    "<reserved_106>",
    "<reserved_107>",
    "<|START_OF_TURN_TOKEN|>",
    "<|END_OF_TURN_TOKEN|>",
    "<|SYSTEM_TOKEN|>",
    "<|USER_TOKEN|>",
    "<|CHATBOT_TOKEN|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eot|>",
    "<|eom|>",
]


@functools.cache
def _tokenizer_with_model_specials():
    tok = copy.deepcopy(tiny_tokenizer())
    tok.add_tokens(MODEL_SPECIALS, special_tokens=True)
    return tok


def _runs(ids, labels):
    """Maximal runs of masked / supervised positions as (supervised, ids)."""
    runs = []
    for tid, lab in zip(ids, labels):
        sup = lab != IGNORE_INDEX
        if runs and runs[-1][0] == sup:
            runs[-1][1].append(tid)
        else:
            runs.append((sup, [tid]))
    return runs


def test_lf_template_lists_are_complete():
    assert set(RENDERED) == set(FIRST_PROMPT_NO_SYSTEM) and set(RENDERED) <= set(TEMPLATES)


@pytest.mark.parametrize("specials", [False, True], ids=["text-markers", "special-markers"])
@pytest.mark.parametrize("name", sorted(RENDERED))
def test_lf_template_two_turns_render_and_mask_exactly(tmp_path, name, specials):
    tok = _tokenizer_with_model_specials() if specials else tiny_tokenizer()
    d = one_dataset(tmp_path, [CONV], formatting="sharegpt")
    ex = build_dataset(dataset="ds", dataset_dir=d, tokenizer=tok, template=name)[0]
    ids, labels = ex["input_ids"], ex["labels"]
    assert tok.decode(ids) == "".join(RENDERED[name])
    # prompt / system / separator tokens are masked, each response (with its end token) is supervised as is
    runs = _runs(ids, labels)
    assert [(sup, tok.decode(run)) for sup, run in runs] == list(zip([False, True] * 2, RENDERED[name]))
    assert all(lab == tid for tid, lab in zip(ids, labels) if lab != IGNORE_INDEX)
    if specials:  # each response ends with one token that generation stops on
        stops = get_template(name).stop_token_ids(tok)
        assert runs[1][1][-1] in stops and runs[3][1][-1] in stops


@pytest.mark.parametrize("name", sorted(FIRST_PROMPT_NO_SYSTEM))
def test_lf_template_default_system_fills_in_for_a_missing_system(name):
    tok = tiny_tokenizer()
    pairs = get_template(name).encode_multiturn(tok, TWO_TURNS)
    assert tok.decode(pairs[0][0]) == FIRST_PROMPT_NO_SYSTEM[name]
    # an explicit system replaces the default one
    pairs = get_template(name).encode_multiturn(tok, TWO_TURNS, system="Be brief.")
    assert [tok.decode(p) for pair in pairs for p in pair] == list(RENDERED[name])


@pytest.mark.parametrize(
    ("name", "observation_prompt"),
    [
        ("mistral", '[TOOL_RESULTS] {"content": 42}[/TOOL_RESULTS]'),
        ("gemma", "\n<start_of_turn>tool\n42<end_of_turn>\n<start_of_turn>model\n"),
        ("qwen3", "\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n"),
        ("yi", "\n<|im_start|>user\n42<|im_end|>\n<|im_start|>assistant\n"),  # LF: observation = user format
        ("llama4", "<|header_start|>ipython<|header_end|>\n\n42<|eot|><|header_start|>assistant<|header_end|>\n\n"),
    ],
)
def test_lf_template_observation_turns(name, observation_prompt):
    tok = tiny_tokenizer()
    messages = [
        {"role": "user", "content": "What is 6 * 7?"},
        {"role": "function", "content": '{"name": "mul", "arguments": {"a": 6, "b": 7}}'},
        {"role": "observation", "content": "42"},
        {"role": "assistant", "content": "42"},
    ]
    pairs = get_template(name).encode_multiturn(tok, messages)
    assert tok.decode(pairs[1][0]) == observation_prompt


def test_qwen3_keeps_an_existing_thought_and_adds_an_empty_one_otherwise():
    tok = tiny_tokenizer()
    messages = [
        {"role": "user", "content": "Add.\n2 + 2"},
        {"role": "assistant", "content": "<think>\n2 and 2 make 4\n</think>\n\n4"},
        {"role": "user", "content": "Reverse.\na b c"},
        {"role": "assistant", "content": "c b a"},
    ]
    pairs = get_template("qwen3").encode_multiturn(tok, messages)
    assert [tok.decode(r) for _, r in pairs] == [
        "<think>\n2 and 2 make 4\n</think>\n\n4<|im_end|>",
        "<think>\n\n</think>\n\nc b a<|im_end|>",
    ]


def test_system_in_user_rejects_token_markers_in_the_system_format():
    with pytest.raises(ConfigError, match="system_in_user"):
        Template(name="bad", format_system="{{bos_token}}{{content}}", system_in_user=True)


def test_unknown_template_error_lists_the_lf_templates():
    with pytest.raises(ConfigError) as err:
        get_template("llama9")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("unknown template 'llama9'; valid templates: ")
    assert set(message.split(": ", 1)[1].split(", ")) == set(TEMPLATES) >= set(RENDERED)
