"""Per-sample gradient features vs a batch-size-1 autograd reference; Adam transform; projectors; matching."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from dataflex.core.errors import ConfigError, DataError
from dataflex.features import (
    Projector,
    adam_transform,
    aggregate,
    checkpoint_weights,
    less_scores,
    per_sample_gradient_features,
    top_k,
)

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = [*ATTN, "gate_proj", "up_proj", "down_proj"]


def tiny_lora(targets: list[str], rank: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = get_peft_model(
        LlamaForCausalLM(cfg), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.1)
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # as after warm-up: B = 0 would make every lora_A gradient zero
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def samples(n: int, *, equal: bool, seed: int = 0) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = 12 if equal else int(torch.randint(4, 24, (1,), generator=gen))
        ids = torch.randint(1, 97, (length,), generator=gen).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=gen))
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def reference(model: torch.nn.Module, rows: list[dict]) -> torch.Tensor:
    """The LESS loop: batch size 1, HF's own loss, flat gradient of the trainable parameters in order."""
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    model.eval()
    out = []
    for r in rows:
        loss = model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss
        out.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(out)


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


def moments(model: torch.nn.Module, seed: int = 3) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            m = torch.randn(p.shape, generator=gen) * 1e-3
            v = torch.rand(p.shape, generator=gen) * 1e-5
            v[..., ::3] = 0.0  # exercise the epsilon floor
            m[..., ::5] = 0.0
            state[name] = {"exp_avg": m, "exp_avg_sq": v}
    return state


def flat(state: dict, model: torch.nn.Module, key: str) -> torch.Tensor:
    return torch.cat([state[n][key].reshape(-1) for n, p in model.named_parameters() if p.requires_grad])


@pytest.mark.parametrize("targets", [ATTN, ALL], ids=["attention", "all-linear"])
@pytest.mark.parametrize("equal", [True, False], ids=["equal-length", "variable-length"])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_sgd_features_equal_the_batch_size_1_reference(targets, equal, batch_size):
    model = tiny_lora(targets)
    rows = samples(7, equal=equal)
    ref = reference(model, rows)
    model.train()  # the extractor switches to eval (dropout off) and restores the mode
    feats = per_sample_gradient_features(model, rows, projector="none", batch_size=batch_size)
    assert feats.shape == ref.shape
    assert max_rel_err(feats, ref) <= 1e-5
    assert model.training


def test_sign_features_are_the_sign_of_each_sample_gradient():
    """LESS's `sign` gradient type: elementwise sign of the per-sample gradient, before projection."""
    model = tiny_lora(ALL)
    rows = samples(5, equal=False)
    ref = reference(model, rows)
    feats = per_sample_gradient_features(model, rows, gradient_type="sign", projector="none", batch_size=3)
    clear = ref.abs() > 1e-6 * ref.abs().amax(dim=1, keepdim=True)  # away from 0, where fp32 order may flip it
    assert torch.equal(feats[clear], torch.sign(ref)[clear])
    assert set(feats.unique().tolist()) <= {-1.0, 0.0, 1.0}


@pytest.mark.parametrize("placement", ["inside", "outside"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_adam_features_equal_the_less_formula_on_the_reference(placement, batch_size):
    model = tiny_lora(ALL, rank=8)
    rows = samples(5, equal=False, seed=4)
    state = moments(model)
    g = reference(model, rows)
    m, v = flat(state, model, "exp_avg"), flat(state, model, "exp_avg_sq")
    # With eps outside the sqrt and v = 0 the transform is ~ sign(g) for |g| >> eps: ill-conditioned where g is
    # near 0, so fp32 summation-order noise (1e-7) would dominate. A larger eps keeps the comparison meaningful.
    b1, b2, eps = 0.8, 0.95, (1e-6 if placement == "inside" else 1e-4)
    num = b1 * m + (1 - b1) * g
    den = b2 * v + (1 - b2) * g**2
    expected = num / torch.sqrt(den + eps) if placement == "inside" else num / (torch.sqrt(den) + eps)
    feats = per_sample_gradient_features(
        model,
        rows,
        gradient_type="adam",
        optimizer_state=state,
        projector="none",
        batch_size=batch_size,
        adam_eps_placement=placement,
        betas=(b1, b2),
        eps=eps,
    )
    assert max_rel_err(feats, expected) <= 1e-5


def test_adam_state_from_a_torch_optimizer_and_a_train_state(tmp_path):
    from dataflex.train.trainer.state import save_train_state

    model = tiny_lora(ATTN)
    rows = samples(4, equal=False, seed=9)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.85, 0.99), eps=1e-7)
    for _ in range(2):
        loss = model(input_ids=torch.tensor([rows[0]["input_ids"]]), labels=torch.tensor([rows[0]["labels"]])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_train_state(tmp_path / "ckpt", model=model, optimizer=opt, scheduler=sched, trainer_state={})
    names = {id(p): n for n, p in model.named_parameters()}
    as_dict = {names[id(p)]: {"exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]} for p, s in opt.state.items()}
    kw = {"gradient_type": "adam", "projector": "sjlt", "proj_dim": 64}
    from_opt = per_sample_gradient_features(model, rows, optimizer_state=opt, **kw)
    from_dir = per_sample_gradient_features(model, rows, optimizer_state=str(tmp_path / "ckpt"), **kw)
    from_dict = per_sample_gradient_features(model, rows, optimizer_state=as_dict, betas=(0.85, 0.99), eps=1e-7, **kw)
    assert torch.equal(from_opt, from_dir) and torch.equal(from_opt, from_dict)


def test_module_called_twice_sums_both_calls():
    """A reused linear layer's per-sample gradient is the sum over its calls (before the Adam transform)."""

    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(11, 6)
            self.lin = torch.nn.Linear(6, 6)
            self.head = torch.nn.Linear(6, 11, bias=False)
            for p in [*self.emb.parameters(), *self.head.parameters()]:
                p.requires_grad_(False)

        def forward(self, input_ids, use_cache=False):
            h = self.lin(torch.tanh(self.lin(self.emb(input_ids))))
            return type("Out", (), {"logits": self.head(h)})()

    torch.manual_seed(0)
    model = Twice()
    rows = samples(3, equal=False, seed=2)
    rows = [
        {"input_ids": [t % 11 for t in r["input_ids"]], "labels": [t if t == -100 else t % 11 for t in r["labels"]]}
        for r in rows
    ]
    params = [model.lin.weight, model.lin.bias]
    ref = []
    for r in rows:
        logits = model(torch.tensor([r["input_ids"]])).logits[0, :-1]
        lab = torch.tensor(r["labels"][1:])
        loss = torch.nn.functional.cross_entropy(logits[lab != -100], lab[lab != -100])
        ref.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    feats = per_sample_gradient_features(model, rows, projector="none", batch_size=2)
    assert max_rel_err(feats, torch.stack(ref)) <= 1e-5


def test_non_linear_trainable_parameters_fall_back_to_the_loop(caplog):
    model = tiny_lora(ATTN)
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)
    rows = samples(3, equal=False, seed=5)
    ref = reference(model, rows)
    feats = per_sample_gradient_features(model, rows, projector="none", batch_size=3)
    assert "per-sample autograd loop" in caplog.text
    assert max_rel_err(feats, ref) <= 1e-5


def test_sample_without_supervised_token_is_an_error():
    model = tiny_lora(ATTN)
    rows = samples(2, equal=True)
    rows[1]["labels"] = [-100] * len(rows[1]["labels"])
    with pytest.raises(DataError, match="sample 1 has no supervised token"):
        per_sample_gradient_features(model, rows, projector="none")


def test_bad_settings_are_config_errors():
    model = tiny_lora(ATTN)
    rows = samples(2, equal=True)
    with pytest.raises(ConfigError, match="gradient_type"):
        per_sample_gradient_features(model, rows, gradient_type="signum")
    with pytest.raises(ConfigError, match="needs optimizer_state"):
        per_sample_gradient_features(model, rows, gradient_type="adam")
    with pytest.raises(ConfigError, match="projector 'fjlt'"):
        per_sample_gradient_features(model, rows, projector="fjlt")
    with pytest.raises(ConfigError, match="no Adam moments for trainable parameter"):
        per_sample_gradient_features(model, rows, gradient_type="adam", optimizer_state={})


def test_adam_transform_matches_formula_with_zero_moments():
    g = torch.tensor([[0.5, -2.0, 0.0]])
    m = torch.zeros(3)
    v = torch.zeros(3)
    inside = adam_transform(g, m, v, (0.9, 0.999), 1e-8, "inside")
    expected = 0.1 * g / torch.sqrt(0.001 * g**2 + 1e-8)
    assert torch.allclose(inside, expected)
    assert inside[0, 2] == 0  # zero gradient, zero moments: 0, never NaN
    outside = adam_transform(g, m, v, (0.9, 0.999), 1e-8, "outside")
    assert torch.allclose(outside, 0.1 * g / (torch.sqrt(0.001 * g**2) + 1e-8))


# ----------------------------------------------------------------------------- projectors


@pytest.mark.parametrize("kind", ["sjlt", "rademacher"])
def test_projector_equals_its_explicit_matrix_and_is_seeded(kind):
    blocks = [("a", 7), ("b", 5)]
    proj = Projector(kind, blocks, proj_dim=4, seed=3)
    x = torch.randn(6, 12)
    out = torch.zeros(6, 4)
    proj.project_into(out, "a", x[:, :7])
    proj.project_into(out, "b", x[:, 7:])
    matrix = torch.cat([proj.matrix("a"), proj.matrix("b")])
    assert torch.allclose(out, x @ matrix, atol=1e-6)
    same = Projector(kind, blocks, proj_dim=4, seed=3)
    assert torch.equal(same.matrix("a"), proj.matrix("a"))
    assert not torch.equal(Projector(kind, blocks, proj_dim=4, seed=4).matrix("a"), proj.matrix("a"))
    if kind == "sjlt":  # one ±1 per input coordinate
        assert torch.equal((matrix != 0).sum(dim=1), torch.ones(12, dtype=torch.long))


@pytest.mark.parametrize("kind", ["sjlt", "rademacher"])
def test_projection_does_not_depend_on_how_modules_are_batched(kind):
    """A block's sub-projector depends on its name only: projecting blocks in any order, or another set of blocks
    around it, gives the same contribution."""
    x = torch.randn(3, 10)
    one = Projector(kind, [("w", 10), ("z", 4)], proj_dim=16, seed=1)
    two = Projector(kind, [("y", 2), ("w", 10)], proj_dim=16, seed=1)
    a, b = torch.zeros(3, 16), torch.zeros(3, 16)
    one.project_into(a, "w", x)
    two.project_into(b, "w", x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["sjlt", "rademacher"])
def test_projection_preserves_norms_and_cosines_within_the_jl_bound(kind):
    torch.manual_seed(0)
    k, n = 1024, 4000
    base = torch.randn(1, n)
    x = torch.cat([base + 0.7 * torch.randn(40, n), torch.randn(40, n)])  # correlated and independent pairs
    proj = Projector(kind, [("p", n)], proj_dim=k, seed=0)
    y = torch.zeros(80, k)
    proj.project_into(y, "p", x)
    ratio = (y.norm(dim=1) / x.norm(dim=1)) ** 2
    assert abs(float(ratio.mean()) - 1) < 0.05
    cos_x = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(x, dim=1).T
    cos_y = torch.nn.functional.normalize(y, dim=1) @ torch.nn.functional.normalize(y, dim=1).T
    err = (cos_x - cos_y).abs()
    # Expected RMS error sqrt((1 + cos^2) / k) <= 1.42 / sqrt(k); the maximum over 3,160 pairs stays near 4 / sqrt(k).
    assert float(err.pow(2).mean().sqrt()) < 1.5 / math.sqrt(k)
    assert float(err.max()) < 5 / math.sqrt(k)


@pytest.mark.parametrize("projector", ["none", "sjlt", "rademacher"])
def test_fused_and_per_parameter_paths_give_the_same_features(projector, monkeypatch):
    """Small models transform + project a batch's concatenated gradients at once; large ones per parameter as
    each gradient completes. Both are the same map."""
    import dataflex.features.gradients as gradients

    model = tiny_lora(ALL, rank=8)
    rows = samples(6, equal=False, seed=9)
    kw = {
        "gradient_type": "adam",
        "optimizer_state": moments(model),
        "projector": projector,
        "proj_dim": 64,
        "seed": 2,
        "batch_size": 4,
    }
    fused = per_sample_gradient_features(model, rows, **kw)
    monkeypatch.setattr(gradients, "FUSED_BUFFER_BYTES", 0)
    per_parameter = per_sample_gradient_features(model, rows, **kw)
    assert max_rel_err(fused, per_parameter) <= 1e-5  # fp32 summation order of one large matmul vs many


def test_projected_features_equal_projected_reference():
    model = tiny_lora(ALL)
    rows = samples(6, equal=False, seed=7)
    raw = per_sample_gradient_features(model, rows, projector="none", batch_size=4)
    names = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    proj = Projector("sjlt", names, proj_dim=32, seed=5)
    expected = raw @ torch.cat([proj.matrix(n) for n, _ in names])
    got = per_sample_gradient_features(model, rows, projector="sjlt", proj_dim=32, seed=5, batch_size=4)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


# ----------------------------------------------------------------------------- matching


def test_less_scores_on_a_hand_computed_example():
    # Two checkpoints, 3 pool samples, 4 target examples in two subtasks (0, 0, 1, 1); 2-d features.
    train = [torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [3.0, 0.0], [1.0, 0.0]])]
    target = [
        torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 5.0]]),
        torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0]]),
    ]
    lrs = [3e-4, 1e-4]  # -> weights 0.75, 0.25
    assert checkpoint_weights(lrs) == pytest.approx([0.75, 0.25])
    r = 1 / math.sqrt(2)
    # cos at ckpt 0 (rows: pool, cols: targets) and ckpt 1
    c0 = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [r, r, r, r]])
    c1 = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    inf = 0.75 * c0 + 0.25 * c1
    by_subtask = torch.stack([inf[:, :2].mean(1), inf[:, 2:].mean(1)], dim=1)
    got = less_scores(train, target, lrs, subtasks=[0, 0, 1, 1], aggregation="max")
    assert torch.allclose(got, by_subtask.max(dim=1).values)
    assert torch.allclose(got, torch.tensor([1.0, 1.0, 0.75 * r + 0.25]))
    mean = less_scores(train, target, lrs, subtasks=[0, 0, 1, 1], aggregation="mean")
    assert torch.allclose(mean, inf.mean(dim=1))


def test_aggregate_subtasks_need_not_be_contiguous():
    scores = torch.tensor([[1.0, 5.0, 3.0, 7.0]])
    assert float(aggregate(scores, [0, 1, 0, 1], "max")) == pytest.approx(6.0)
    assert float(aggregate(scores, [0, 1, 0, 1], "mean")) == pytest.approx(4.0)


def test_top_k_ties_and_nans_are_deterministic(caplog):
    scores = torch.tensor([0.5, float("nan"), 0.9, 0.5, 0.9, 0.1, 0.5])
    assert top_k(scores, max_samples=4) == [2, 4, 0, 3]
    assert top_k(scores, max_samples=7)[-1] == 1  # NaN ranks last
    assert "NaN" in caplog.text
    assert top_k(scores, percentage=0.3) == [2, 4]  # int(0.3 * 7) = 2, as LESS
    assert top_k(scores, percentage=0.01) == [2]  # at least one
    with pytest.raises(ConfigError, match="percentage"):
        top_k(scores, percentage=1.5)
    with pytest.raises(ConfigError, match="learning rates"):
        checkpoint_weights([0.0, 0.0])
