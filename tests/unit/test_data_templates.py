"""Templates: exact prompt/response masking for every template, multi-turn, tokenizer chat templates."""

from __future__ import annotations

import copy

import pytest

from dataflex.core.errors import ConfigError
from dataflex.data import IGNORE_INDEX, TEMPLATES, build_dataset, get_template

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
    for name in ("default", "chatml", "tokenizer"):
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
