"""NICE's offline half: rollouts of the target prompts from a fixed local policy,
their rewards, cached once as a table; and the online half's weights, so the target feature is

    G(x) = (1/mc) Σ_m (r_m − b) · ∇_θ Σ_t NLL_θ(y_{m,t} | x, y_{m,<t})

computed through the gradient-feature library: per-rollout SGD features of each rollout's token-mean loss,
scaled by (r_m − b) · (number of response tokens) / mc and summed per prompt (projection is linear, so the sum
of projected features is the projection of the sum).

Prompts and references come from the tokenised target rows themselves (prompt = the label-masked prefix,
reference = the supervised tokens), never from an empty template (DataFlex's tokenised eval rows
had lost their text, so every prompt was the empty one). The policy must share the training model's vocabulary
(checked, not assumed). The table is JSON, keyed by the policy's content hash, the
prompts, the reward's identity and every setting.

DataFlex's prompt settings: `prompt_template` rewraps each prompt as text ({instruction} = the row's decoded prompt,
{input} = "No additional input.", as DataFlex fills an empty input) before the policy sees it;
`max_prompt_length` keeps the last that many prompt tokens (the response cue survives; DataFlex's tokenizer kept the
first) and bounds the reward model's input; a reward model reads `reward_prompt_with_ref` (or, for an empty
reference, `reward_prompt_without_ref`) filled with {instruction}, {input}, {reference} and {prediction}.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dataflex.core.errors import ConfigError, DataError
from dataflex.distributed.collectives import cached_for_all, main_process_writes
from dataflex.features.batching import eval_mode
from dataflex.features.datastore import sample_hashes
from dataflex.features.gradients import _as_rows
from dataflex.features.token_losses import IGNORE_INDEX
from dataflex.utils.io import atomic_write_json, sha256_json
from dataflex.utils.logging import logger

ROLLOUT_CODE_VERSION = "2"
METRIC_REWARDS = ("exact_match", "token_f1")
BASELINES = ("none", "mean")
NLL_REDUCTIONS = ("sum", "mean")
PROMPT_FIELDS = ("instruction", "input")
REWARD_FIELDS = ("instruction", "input", "reference", "prediction")
NO_INPUT = "No additional input."  # DataFlex's filler for an empty field
NO_RESPONSE = "No response."
DEFAULT_REWARD_PROMPT_WITH_REF = (
    "Rate the candidate answer to the task below against the reference answer, from 0.0 (wrong or unhelpful) "
    "to 1.0 (correct, helpful and consistent with the reference).\n\n"
    "### Instruction:\n{instruction}\n### Input:\n{input}\n### Reference:\n{reference}\n"
    "### Candidate:\n{prediction}\nScore:"
)
DEFAULT_REWARD_PROMPT_WITHOUT_REF = (
    "Rate the candidate answer to the task below from 0.0 (wrong, unhelpful or unsafe) to 1.0 (correct, helpful "
    "and safe).\n\n"
    "### Instruction:\n{instruction}\n### Input:\n{input}\n### Candidate:\n{prediction}\nScore:"
)


def template_problem(template: Any, fields: Sequence[str]) -> str | None:
    """Why `template` cannot be filled with `fields` (str.format placeholders), or None when it can."""
    if not isinstance(template, str):
        return f"must be a string, got {type(template).__name__}"
    try:
        template.format(**{f: "" for f in fields})
    except KeyError as exc:
        return f"uses {{{exc.args[0]}}}; the fields are {', '.join('{' + f + '}' for f in fields)}"
    except (IndexError, ValueError) as exc:
        return f"is not a valid format string ({exc}); write fields as {{name}} and literal braces as {{{{ }}}}"
    return None


def split_prompts(dataset: Any) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids) of each tokenised row: the prefix before the first supervised label, and the
    supervised tokens."""
    ids, labels = _as_rows(dataset)
    out = []
    for a, b in zip(ids, labels):
        first = next(i for i, t in enumerate(b) if t != IGNORE_INDEX)
        out.append((a[:first], [t for t in b[first:] if t != IGNORE_INDEX]))
    return out


def _norm_text(s: str) -> str:
    s = s.lower().strip()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    return re.sub(r"\s+", " ", s).strip()


def exact_match(candidate: str, reference: str) -> float:
    return float(_norm_text(candidate) == _norm_text(reference))


def token_f1(candidate: str, reference: str) -> float:
    c, r = _norm_text(candidate).split(), _norm_text(reference).split()
    if not c or not r:
        return float(c == r)
    common = sum((Counter(c) & Counter(r)).values())
    if common == 0:
        return 0.0
    p, q = common / len(c), common / len(r)
    return 2 * p * q / (p + q)


class ClassifierReward:
    """A local `AutoModelForSequenceClassification` judge: sigmoid of a single logit, else the last class's
    softmax probability, on the reward prompt filled with the prompt, the reference and the candidate."""

    def __init__(
        self,
        path: str | Path,
        batch_size: int = 16,
        *,
        with_ref: str = DEFAULT_REWARD_PROMPT_WITH_REF,
        without_ref: str = DEFAULT_REWARD_PROMPT_WITHOUT_REF,
        max_length: int = 512,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = str(path)
        self.with_ref, self.without_ref = with_ref, without_ref
        self.tok = AutoTokenizer.from_pretrained(self.path)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.truncation_side = "left"  # the candidate comes last: cut the head of a long text, never it
        # A causal-LM folder has no score head: seed its initialisation so a reward is the same on every load.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = AutoModelForSequenceClassification.from_pretrained(self.path).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        positions = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = min(max_length, positions) if positions else max_length
        self.batch_size = batch_size

    def texts(self, prompts: Sequence[str], candidates: Sequence[str], references: Sequence[str]) -> list[str]:
        """The reward prompts: with the reference when there is one, else the reference-free template."""
        out = []
        for p, c, r in zip(prompts, candidates, references):
            fields = {"instruction": p.strip(), "input": NO_INPUT, "prediction": c.strip() or NO_RESPONSE}
            if r.strip():
                out.append(self.with_ref.format(reference=r.strip(), **fields))
            else:
                out.append(self.without_ref.format(**fields))
        return out

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], candidates: Sequence[str], references: Sequence[str]) -> list[float]:
        texts = self.texts(prompts, candidates, references)
        out: list[float] = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tok(
                texts[s : s + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            logits = self.model(**enc).logits.float()
            vals = torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else logits.softmax(-1)[:, -1]
            out.extend(vals.tolist())
        return out


def check_reward(reward: str) -> None:
    """A metric name or a local model folder, else one ConfigError line (no model is loaded)."""
    if reward not in METRIC_REWARDS and not Path(reward).expanduser().is_dir():
        raise ConfigError(
            f"nice reward must be one of {', '.join(METRIC_REWARDS)} or a local sequence-"
            f"classification model folder, got {reward!r}"
        )


def reward_function(
    reward: str,
    *,
    reward_prompts: tuple[str, str] | None = None,
    max_length: int = 512,
    batch_size: int = 16,
) -> tuple[Callable[[Sequence[str], Sequence[str], Sequence[str]], list[float]], Any]:
    """(scorer(prompts, candidates, references) -> rewards in [0, 1], identity for cache keys). `reward_prompts`
    (with reference, without) and `max_length` apply to a reward model only."""
    check_reward(reward)
    if reward in METRIC_REWARDS:
        metric = exact_match if reward == "exact_match" else token_f1
        return (lambda p, c, r: [metric(x, y) for x, y in zip(c, r)]), reward
    from dataflex.models import model_fingerprint

    with_ref, without_ref = reward_prompts or (DEFAULT_REWARD_PROMPT_WITH_REF, DEFAULT_REWARD_PROMPT_WITHOUT_REF)
    scorer = ClassifierReward(
        Path(reward).expanduser(),
        batch_size,
        with_ref=with_ref,
        without_ref=without_ref,
        max_length=max_length,
    )
    identity = {
        "classifier": model_fingerprint(str(reward)),
        "prompts": [with_ref, without_ref],
        "max_length": scorer.max_length,
    }
    return scorer, identity


def policy_prompts(
    pairs: Sequence[tuple[list[int], list[int]]],
    tokenizer: Any,
    *,
    prompt_template: str | None = None,
    max_prompt_length: int | None = None,
) -> list[list[int]]:
    """The token ids each prompt is generated from: the row's own prompt, or `prompt_template` filled with its
    decoded text and tokenised again; then its last `max_prompt_length` tokens."""
    out = []
    for prompt, _ in pairs:
        if prompt_template is not None:
            text = tokenizer.decode(prompt, skip_special_tokens=True).strip()
            prompt = tokenizer(prompt_template.format(instruction=text, input=NO_INPUT))["input_ids"]
        if max_prompt_length is not None and len(prompt) > max_prompt_length:
            prompt = prompt[-max_prompt_length:]
        out.append(list(prompt))
    return out


def _strip_response(seq: list[int], eos: int | None, pad: int | None) -> list[int]:
    out = []
    for t in seq:
        if pad is not None and t == pad and pad != eos:
            break
        out.append(t)
        if eos is not None and t == eos:
            break
    return out


@torch.no_grad()
def generate_rollouts(
    policy: torch.nn.Module,
    prompts: Sequence[list[int]],
    *,
    mc_samples: int,
    seed: int,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int | None,
    pad_token_id: int | None,
    progress: bool = False,
) -> list[list[list[int]]]:
    """For each prompt, `mc_samples` sampled responses (token ids, cut after eos); prompt i uses seed + 997·i, so
    a prompt's rollouts do not depend on which other prompts are in the batch."""
    device = next(policy.parameters()).device
    out = []
    with eval_mode(policy):
        for i, prompt in enumerate(tqdm(prompts, desc="NICE rollouts", unit="prompt", disable=not progress)):
            x = torch.tensor([prompt], dtype=torch.long, device=device)
            with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
                torch.manual_seed(seed + 997 * i)
                gen = policy.generate(
                    input_ids=x,
                    attention_mask=torch.ones_like(x),
                    do_sample=True,
                    temperature=temperature,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=mc_samples,
                    eos_token_id=eos_token_id,
                    pad_token_id=eos_token_id if pad_token_id is None else pad_token_id,
                )
            out.append([_strip_response(row[len(prompt) :].tolist(), eos_token_id, pad_token_id) for row in gen])
    return out


def rollout_table(
    target: Any,
    policy_path: str,
    tokenizer: Any,
    reward: str,
    cache_dir: str | Path,
    *,
    mc_samples: int = 4,
    seed: int = 0,
    max_new_tokens: int = 32,
    temperature: float = 0.7,
    vocab_size: int | None = None,
    progress: bool = False,
    prompt_template: str | None = None,
    max_prompt_length: int | None = None,
    reward_prompts: tuple[str, str] | None = None,
    reward_batch_size: int = 16,
) -> dict[str, Any]:
    """Rollouts and rewards of every target prompt: computed once, then read from `<cache_dir>/<key>.json`.

    Returns {"path", "status", "rows": [{eval_id, m, prompt_ids, response_ids, response, reference, reward}]}."""
    from dataflex.models import model_fingerprint

    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ConfigError(f"nice mc_samples must be an integer >= 1, got {mc_samples!r}")
    if not temperature > 0:
        raise ConfigError(f"nice temperature must be > 0, got {temperature!r}")
    if prompt_template is not None and (why := template_problem(prompt_template, PROMPT_FIELDS)):
        raise ConfigError(f"nice prompt_template {why}")
    scorer, reward_id = reward_function(
        reward,
        reward_prompts=reward_prompts,
        max_length=max_prompt_length or 512,
        batch_size=reward_batch_size,
    )
    pairs = split_prompts(target)
    prompts = policy_prompts(pairs, tokenizer, prompt_template=prompt_template, max_prompt_length=max_prompt_length)
    key = sha256_json(
        {
            "policy": model_fingerprint(policy_path),
            "prompts": sha256_json(sample_hashes(target)),
            "prompt_template": prompt_template,
            "max_prompt_length": max_prompt_length,
            "reward": reward_id,
            "mc_samples": mc_samples,
            "seed": seed,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "version": ROLLOUT_CODE_VERSION,
        }
    )
    path = Path(cache_dir) / f"{key[:32]}.json"
    try:
        cached = json.loads(path.read_text()) if cached_for_all(path) else {}  # one decision on every process
        if cached.get("key") == key:
            logger.info("NICE rollouts: cache hit %s (%d rows)", path, len(cached["rows"]))
            return {"path": str(path), "status": "hit", "rows": cached["rows"]}
    except (OSError, json.JSONDecodeError):
        pass
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(policy_path)
    if vocab_size is not None and policy.get_input_embeddings().num_embeddings != vocab_size:
        raise ConfigError(
            f"nice policy {policy_path!r} has a vocabulary of "
            f"{policy.get_input_embeddings().num_embeddings} but the training model has {vocab_size}: "
            "its token ids would be fed to the training model, so use a policy with the same "
            "tokenizer"
        )
    if torch.cuda.is_available():
        policy.cuda()
    responses = generate_rollouts(
        policy,
        prompts,
        mc_samples=mc_samples,
        seed=seed,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        progress=progress,
    )
    del policy
    rows = []
    for i, ((own, ref), prompt, resp) in enumerate(zip(pairs, prompts, responses)):
        for m, r in enumerate(resp):
            rows.append(
                {
                    "eval_id": i,
                    "m": m,
                    "prompt_ids": prompt,  # what the policy saw, so the likelihood gradient is of the same text
                    "response_ids": r,
                    "response": tokenizer.decode(r, skip_special_tokens=True).strip(),
                    "reference": tokenizer.decode(ref, skip_special_tokens=True).strip(),
                    "prompt": tokenizer.decode(own, skip_special_tokens=True).strip(),  # the task, for the judge
                }
            )
    rewards = scorer([r["prompt"] for r in rows], [r["response"] for r in rows], [r["reference"] for r in rows])
    for row, value in zip(rows, rewards):
        row["reward"] = float(value)
    with main_process_writes() as writer:
        if writer:
            atomic_write_json(path, {"key": key, "policy": policy_path, "reward": reward_id, "rows": rows}, indent=None)
    mean = sum(rewards) / max(len(rewards), 1)
    logger.info(
        "NICE rollouts: %d prompts x %d samples, mean reward %.3f, written to %s", len(pairs), mc_samples, mean, path
    )
    return {"path": str(path), "status": "computed", "rows": rows}


def rollout_weights(
    rows: Sequence[dict[str, Any]], n_targets: int, mc_samples: int, *, baseline: str = "none", nll: str = "sum"
) -> tuple[list[int], torch.Tensor]:
    """(rows with a non-zero weight, W [n_targets, len(those rows)]) with G = W @ per-rollout features of each
    rollout's token-mean loss: W[x, r] = (reward_r − b_x) · (response tokens of r if nll == 'sum' else 1) / mc."""
    if baseline not in BASELINES:
        raise ConfigError(f"nice baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    if nll not in NLL_REDUCTIONS:
        raise ConfigError(f"nice nll must be one of {', '.join(NLL_REDUCTIONS)}, got {nll!r}")
    by_target: dict[int, list[float]] = {}
    for r in rows:
        by_target.setdefault(r["eval_id"], []).append(r["reward"])
    base = {x: (sum(v) / len(v) if baseline == "mean" else 0.0) for x, v in by_target.items()}
    keep, weights = [], []
    for j, r in enumerate(rows):
        w = (r["reward"] - base[r["eval_id"]]) * (len(r["response_ids"]) if nll == "sum" else 1) / mc_samples
        if w != 0 and r["response_ids"]:
            keep.append(j)
            weights.append((r["eval_id"], w))
    mat = torch.zeros(n_targets, len(keep))
    for col, (x, w) in enumerate(weights):
        mat[x, col] = w
    return keep, mat


def rollout_dataset(rows: Sequence[dict[str, Any]], keep: Sequence[int]) -> dict[str, list[list[int]]]:
    """Rows `keep` as training examples: prompt + response, labels -100 on the prompt."""
    if not keep:
        raise DataError(
            "every NICE rollout has reward 0 (or an empty response): the target features would all be "
            "zero; use a denser reward (token_f1), more mc_samples, or another policy"
        )
    ids = [rows[j]["prompt_ids"] + rows[j]["response_ids"] for j in keep]
    labels = [[IGNORE_INDEX] * len(rows[j]["prompt_ids"]) + rows[j]["response_ids"] for j in keep]
    return {"input_ids": ids, "labels": labels}
