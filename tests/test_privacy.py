"""Privacy (issue 38): pseudonymous user ids in prepare, differentially private fine-tuning.

Everything runs in this process on a tiny synthetic log read from memory:// (so prepare needs no
Ray), a tiny pretrained model and DP fine-tuning with scaling.workers=0.
"""

import json
import math
import os
import pickle
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from flm_dist.config import ConfigKeyError, ModelConfig, load_config
from flm_dist.data.prepare import PrepareConfig, run_prepare
from flm_dist.data.pseudonyms import (
    MIN_KEY_BYTES,
    PrivacyConfig,
    Pseudonymizer,
    load_pseudonymizer,
)
from flm_dist.data.synth import SynthConfig, run_synth
from flm_dist.errors import UserError
from flm_dist.experiments.report import read_run, run_page
from flm_dist.models.recommender import Recommender
from flm_dist.runs import build_model
from flm_dist.train.checkpoint import load_checkpoint
from flm_dist.train.configs import FinetuneConfig, PretrainConfig
from flm_dist.train.finetune import run_finetune
from flm_dist.train.pretrain import run_pretrain
from flm_dist.train.private import (
    PrivacyPlan,
    _check_per_user_gradients,
    _PerUserLoss,
    attach_privacy,
    check_private_model,
    make_plan,
    spent_epsilon,
    steps_within_budget,
)

opacus = pytest.importorskip("opacus")
pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook is firing"),  # Opacus hooks, frozen inputs
              pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")]

KEY = b"test-pseudonym-key::" + bytes(range(33, 80))  # 67 bytes, printable
OTHER_KEY = b"another-key-of-enough-length::" + b"q" * 20
SMALL = ["model.hidden=16", "model.heads=2", "model.max_len=12", "model.flow_hidden=16", "model.flow_layers=2",
         "model.positions=first", "model.cf_user=history", "train.batch_size=64", "train.warmup_steps=2",
         "eval.batch_size=128"]


def _log() -> str:
    uri = f"memory://privacy-log-{uuid.uuid4().hex}"
    run_synth(SynthConfig(output=uri, users=200, items=80, interactions=4000, seed=3))
    return uri


def _prepare(log: str, output: Path, key: bytes | None) -> dict:
    """Prepare `log` (in this process: the input is in memory) with pseudonyms under `key`."""
    with pytest.MonkeyPatch.context() as patch:
        if key is not None:
            patch.setenv("FLM_PSEUDONYM_KEY", key.decode())
        return run_prepare(PrepareConfig(input=log, format="parquet", output=str(output),
                                         privacy=PrivacyConfig(pseudonymize_users=key is not None)))


def _finetune(pretrained, data, output, *overrides):
    return load_config(FinetuneConfig, None, [f"pretrained={pretrained}", f"data={data}", f"output={output}",
                                              "scaling.workers=0", "train.batch_size=64", "eval.batch_size=128",
                                              "train.warmup_steps=1", *overrides])


@pytest.fixture(scope="module")
def private_runs(tmp_path_factory):
    """Pseudonymous data, a tiny pretraining on it, and DP fine-tuning (frozen and full)."""
    root = tmp_path_factory.mktemp("privacy")
    log = _log()
    data = root / "data"
    manifest = _prepare(log, data, KEY)
    run_pretrain(load_config(PretrainConfig, None, [f"data={data}", f"output={root / 'pretrained'}", *SMALL,
                                                    "scaling.workers=0", "train.epochs=1"]))
    frozen = run_finetune(_finetune(root / "pretrained", data, root / "frozen", "finetune.mode=frozen",
                                    "train.epochs=3", "finetune.privacy.epsilon=2", "train.lr=0.01"))
    full = run_finetune(_finetune(root / "pretrained", data, root / "full", "finetune.mode=full",
                                  "train.epochs=2", "finetune.privacy.epsilon=4", "finetune.privacy.delta=1e-4"))
    return {"root": root, "log": log, "data": data, "manifest": manifest, "frozen": frozen, "full": full}


# ---- pseudonymous user ids ----------------------------------------------------------------------


def test_the_keyed_hash_is_stable_with_a_key_and_differs_with_another():
    ids = ["1", "42", "alice", "ünï", "42"]
    first, again = Pseudonymizer(KEY).ids(pyarrow_array(ids)).to_pylist(), Pseudonymizer(KEY).ids(
        pyarrow_array(ids)).to_pylist()
    other = Pseudonymizer(OTHER_KEY).ids(pyarrow_array(ids)).to_pylist()
    assert first == again and first[1] == first[4]
    assert first == [Pseudonymizer(KEY).pseudonym(i) for i in ids]
    assert all(len(p) == 32 and int(p, 16) >= 0 for p in first)
    assert not set(first) & set(other)
    assert Pseudonymizer(KEY).fingerprint != Pseudonymizer(OTHER_KEY).fingerprint
    assert Pseudonymizer(KEY).fingerprint not in first  # domain-separated from every pseudonym
    pseudonymizer = Pseudonymizer(KEY)
    assert KEY.decode() not in repr(pseudonymizer) and KEY.decode() not in str(pseudonymizer)
    assert pickle.loads(pickle.dumps(pseudonymizer)).pseudonym("7") == pseudonymizer.pseudonym("7")


def pyarrow_array(values):
    import pyarrow as pa

    return pa.array(values, pa.string())


def test_prepare_writes_pseudonyms_stable_across_runs(private_runs, tmp_path):
    data, log = private_runs["data"], private_runs["log"]
    users = pq.read_table(data / "vocab" / "users.parquet").column("user_id").to_pylist()
    raw_users = {str(u) for u in _original_users(log)}
    assert set(users) <= {Pseudonymizer(KEY).pseudonym(u) for u in raw_users}
    assert not set(users) & raw_users
    section = private_runs["manifest"]["privacy"]
    assert section == {"pseudonymous_users": True, "method": "HMAC-SHA256, first 32 hex digits",
                       "key_fingerprint": Pseudonymizer(KEY).fingerprint}
    _prepare(log, tmp_path / "same", KEY)
    _prepare(log, tmp_path / "other", OTHER_KEY)
    same = pq.read_table(tmp_path / "same" / "vocab" / "users.parquet").column("user_id").to_pylist()
    other = pq.read_table(tmp_path / "other" / "vocab" / "users.parquet").column("user_id").to_pylist()
    assert same == users
    assert not set(other) & set(users)
    # Without pseudonyms the config hash is the one it always was (no privacy section stored).
    plain = _prepare(log, tmp_path / "plain", None)
    assert "privacy" not in plain and "privacy" not in plain["config"]


def _original_users(log: str) -> list:
    import fsspec

    fs = fsspec.filesystem("memory")
    root = log.removeprefix("memory://")
    return [u for path in fs.find(root) if path.endswith(".parquet")
            for u in pq.read_table(path, filesystem=fs).column("user_id").to_pylist()]


def test_serving_answers_with_pseudonyms(private_runs):
    from flm_dist.recommend import RecommenderService

    service = RecommenderService.load(str(private_runs["root"] / "frozen" / "best"), str(private_runs["data"]))
    original = str(_original_users(private_runs["log"])[0])
    pseudonym = Pseudonymizer(KEY).pseudonym(original)
    status, answer = service.answer({"user": pseudonym, "k": 3})
    assert status == 200 and answer["user"] == pseudonym and len(answer["recommendations"]) == 3
    assert service.answer({"user": original})[0] == 404  # the original id is unknown to the service


def test_the_key_is_in_no_file_written(private_runs, caplog):
    written = [p for p in private_runs["root"].rglob("*") if p.is_file()]
    assert len(written) > 20
    key_forms = [KEY, KEY.hex().encode(), KEY[:MIN_KEY_BYTES]]
    for path in written:
        content = path.read_bytes()
        assert not any(form in content for form in key_forms), path
    assert KEY.decode() not in caplog.text


def test_missing_or_short_key_is_refused(tmp_path):
    config = PrivacyConfig(pseudonymize_users=True)
    with pytest.raises(UserError, match="needs a key: set the environment variable FLM_PSEUDONYM_KEY") as missing:
        load_pseudonymizer(config, environ={})
    with pytest.raises(UserError, match=f"is 12 bytes; it needs at least {MIN_KEY_BYTES}") as short:
        load_pseudonymizer(config, environ={"FLM_PSEUDONYM_KEY": "short-secret"})
    with pytest.raises(UserError, match="privacy.key_file: cannot read"):
        load_pseudonymizer(PrivacyConfig(pseudonymize_users=True, key_file=str(tmp_path / "absent")))
    assert "\n" not in str(missing.value) + str(short.value) and "short-secret" not in str(short.value)
    (tmp_path / "key").write_bytes(KEY + b"\n")
    from_file = load_pseudonymizer(PrivacyConfig(pseudonymize_users=True, key_file=str(tmp_path / "key")))
    assert from_file.pseudonym("1") == Pseudonymizer(KEY).pseudonym("1")
    assert load_pseudonymizer(PrivacyConfig(), environ={}) is None
    # prepare refuses before it reads or writes anything
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("FLM_PSEUDONYM_KEY", raising=False)
        with pytest.raises(UserError, match="needs a key"):
            run_prepare(PrepareConfig(input=str(tmp_path / "no-such-input"), output=str(tmp_path / "out"),
                                      privacy=PrivacyConfig(pseudonymize_users=True)))
    assert not (tmp_path / "out").exists()


# ---- accounting ---------------------------------------------------------------------------------


def test_the_accountant_epsilon_is_opacus_own():
    from opacus.accountants import PRVAccountant, RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    noise, rate, steps, delta = 1.1, 0.01, 1000, 1e-5
    orders = RDPAccountant.DEFAULT_ALPHAS
    expected, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=rate, noise_multiplier=noise, steps=steps,
                                                                    orders=orders), delta=delta)
    assert spent_epsilon("rdp", [(noise, rate, steps)], delta) == pytest.approx(expected, rel=1e-12)
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise, sample_rate=rate)
    assert spent_epsilon("rdp", accountant.history, delta) == pytest.approx(accountant.get_epsilon(delta), rel=1e-12)
    prv = PRVAccountant()
    prv.history = [(noise, rate, steps)]
    assert spent_epsilon("prv", [(noise, rate, steps)], delta) == pytest.approx(prv.get_epsilon(delta), rel=1e-9)


def test_the_noise_meets_the_target_and_the_budget_stops_steps():
    config = _finetune("p", "d", "o", "train.epochs=5", "finetune.privacy.epsilon=1", "finetune.privacy.delta=1e-3")
    plan = make_plan(config, users=500)
    assert plan.sample_rate == 1 / math.ceil(500 / 64) and plan.planned_steps == 5 * plan.steps_per_epoch
    spent = spent_epsilon("rdp", [(plan.noise_multiplier, plan.sample_rate, plan.planned_steps)], plan.delta)
    assert 0.98 <= spent <= 1.0
    assert steps_within_budget(plan, [], plan.planned_steps) == plan.planned_steps
    # A budget planned for `planned_steps` runs out a little after them; never beyond.
    allowed = steps_within_budget(plan, [], 100 * plan.planned_steps)
    assert plan.planned_steps <= allowed < 100 * plan.planned_steps
    history = [(plan.noise_multiplier, plan.sample_rate, allowed)]
    assert spent_epsilon("rdp", history, plan.delta) <= 1.0
    assert spent_epsilon("rdp", [(plan.noise_multiplier, plan.sample_rate, allowed + 1)], plan.delta) > 1.0
    assert steps_within_budget(plan, history, 10) == 0


def test_a_dp_run_reports_epsilon_within_the_target(private_runs):
    root = private_runs["root"]
    for name, target in (("frozen", 2.0), ("full", 4.0)):
        summary = private_runs[name]
        spent = [record["privacy/epsilon"] for record in summary["history"]]
        assert spent == sorted(spent) and 0 < spent[-1] <= target
        privacy = summary["privacy"]
        assert privacy["epsilon"] == spent[-1] <= target and privacy["plan"]["target_epsilon"] == target
        assert privacy["steps"] == summary["steps"] == privacy["plan"]["planned_steps"]
        assert json.loads((root / name / "metrics.json").read_text())["privacy"]["epsilon"] == privacy["epsilon"]
        meta = load_checkpoint(root / name / "best")[1]
        assert meta["privacy"]["epsilon"] == privacy["epsilon"]
        for checkpoint in (root / name / "checkpoints").iterdir():
            assert load_checkpoint(checkpoint)[1]["privacy"]["epsilon"] <= target
        assert summary["best"]["epoch"] == summary["history"][-1]["epoch"]  # best/ = newest, not chosen
        html = run_page(read_run(root / name), 50)
        assert "Differential privacy" in html and f"{privacy['epsilon']:.4f}" in html
    assert private_runs["full"]["privacy"]["plan"]["delta"] == 1e-4
    assert private_runs["frozen"]["privacy"]["plan"]["delta"] == pytest.approx(
        1 / private_runs["frozen"]["privacy"]["plan"]["users"])


def test_dp_trains_only_what_per_user_clipping_covers(private_runs):
    root = private_runs["root"]
    assert private_runs["frozen"]["privacy"]["trained_parameters"] == ["head.linear.weight", "head.linear.bias"]
    trained = private_runs["full"]["privacy"]["trained_parameters"]
    assert any(name.startswith("backbone.sequence.blocks.") for name in trained)
    assert "backbone.item_embedding.weight" in trained  # through the output layer tied to it
    assert "backbone.fusion.projection.weight" in trained  # source=fused (the default) reads the fusion
    assert not any(name.startswith("backbone.flow.") for name in trained)
    pretrained = load_checkpoint(root / "pretrained" / "best")[0]["model"]
    tuned = load_checkpoint(root / "full" / "best")[0]["model"]
    flow = [key for key in pretrained if key.startswith("flow.")]
    assert flow and all(torch.equal(pretrained[key], tuned[f"backbone.{key}"]) for key in flow)
    assert not torch.equal(pretrained["item_embedding.weight"], tuned["backbone.item_embedding.weight"])
    assert not tuned["backbone.item_embedding.weight"][0].any()  # the padding row stays zero


# ---- clipping -----------------------------------------------------------------------------------


def _tiny_recommender(mode: str = "full") -> Recommender:
    torch.manual_seed(0)
    config = ModelConfig(hidden=8, heads=2, layers=1, max_len=6, flow_layers=1, flow_hidden=8, positions="first",
                         cf_user="history")
    return Recommender(build_model(config, num_users=10, num_items=20), head="linear", source="sequence",
                       frozen=mode == "frozen")


def _rows(n: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    items = torch.randint(1, 21, (n, 7), generator=generator)
    return {"user": torch.arange(n), "input": items[:, :-1].clone(), "target": items[:, 1:].clone()}


def _private(model: Recommender, max_grad_norm: float, users: int, tie_output: bool = True, before_wrapping=None):
    from flm_dist.train import private

    weights = {"seq": 1.0, "fused": 1.0}
    private._trained_parameters(model, "full" if not model.frozen else "frozen", weights, "all")
    if before_wrapping is not None:
        before_wrapping(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    plan = PrivacyPlan(target_epsilon=1.0, delta=1e-3, max_grad_norm=max_grad_norm, accountant="rdp", users=users,
                       sample_rate=1.0, expected_batch_size=users, steps_per_epoch=1, planned_steps=1,
                       noise_multiplier=0.0)
    return attach_privacy(_PerUserLoss(model, weights, "all", tie_output), optimizer, plan, batch_size=users)


@pytest.mark.parametrize("mode", ["full", "frozen"])
def test_clipping_bounds_each_users_gradient(mode):
    max_grad_norm = 1e-3  # far below every raw per-user gradient norm, so clipping is active
    rows = _rows(6)
    for user in range(6):
        model = _tiny_recommender(mode)
        _, wrapped, optimizer, _ = _private(model, max_grad_norm, users=1)
        batch = {k: v[user:user + 1] for k, v in rows.items()}
        wrapped(batch).mean().backward()
        _check_per_user_gradients(model, 1)
        trained = [p for p in model.parameters() if p.requires_grad]
        raw = torch.cat([p.grad_sample.reshape(1, -1) for p in trained], dim=1).norm(dim=1)
        assert raw.item() > 10 * max_grad_norm
        optimizer.clip_and_accumulate()  # what step() does before the (here zero) noise
        clipped = torch.cat([p.summed_grad.reshape(-1) for p in trained]).norm()
        assert clipped.item() <= max_grad_norm * (1 + 1e-4)
    # A batch of users: each one's clipped gradient is at most max_grad_norm, so the sum is at most n x that.
    model = _tiny_recommender(mode)
    _, wrapped, optimizer, _ = _private(model, max_grad_norm, users=6)
    wrapped(rows).mean().backward()
    per_user = torch.cat([p.grad_sample.reshape(6, -1) for p in model.parameters() if p.requires_grad], 1).norm(dim=1)
    assert (per_user > max_grad_norm).all()
    optimizer.clip_and_accumulate()
    total = torch.cat([p.summed_grad.reshape(-1) for p in model.parameters() if p.requires_grad]).norm()
    assert total.item() <= 6 * max_grad_norm * (1 + 1e-4)


def test_per_user_gradients_equal_one_user_at_a_time():
    """Every trained parameter, the item table (input embedding, CF and output layer at once)
    included: Opacus's per-user gradient of row i is the gradient of user i's loss alone."""
    model = _tiny_recommender("full")
    for module in model.modules():  # no dropout: the same function in both computations
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    _, wrapped, _, _ = _private(model, 1.0, users=4)
    rows = _rows(4)
    rows["input"][:, :2], rows["target"][:, :2] = 0, 0  # left padding, as in real windows
    wrapped(rows).mean().backward()
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert "backbone.item_embedding.weight" in trained
    samples = {name: p.grad_sample.clone() for name, p in trained.items()}
    wrapped.disable_hooks()
    for user in range(4):
        loss = model.example_losses({k: v[user:user + 1] for k, v in rows.items()}, {"seq": 1.0, "fused": 1.0}, "all")
        alone = torch.autograd.grad(loss.sum(), list(trained.values()))
        for (name, _), expected in zip(trained.items(), alone):
            torch.testing.assert_close(samples[name][user], expected, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("case", ["output layer not tied", "unfrozen after wrapping"])
def test_a_table_outside_the_hooks_fails_the_gradient_check(case):
    """The item table is also the output layer: untied, Opacus's hooks see its lookups only (and,
    unfrozen after wrapping, nothing), so its per-user gradients would miss part of its gradient."""
    model = _tiny_recommender("full")
    if case == "output layer not tied":
        _, wrapped, _, _ = _private(model, 1.0, users=4, tie_output=False)
    else:
        _, wrapped, _, _ = _private(model, 1.0, users=4,
                                    before_wrapping=lambda m: m.backbone.item_embedding.requires_grad_(False))
        model.backbone.item_embedding.requires_grad_(True)
    wrapped(_rows(4)).mean().backward()
    with pytest.raises(UserError, match=r"item_embedding\.weight (do not add up|has no per-user gradient)") as caught:
        _check_per_user_gradients(model, 4)
    assert ("do not add up" in str(caught.value)) == (case == "output layer not tied")


# ---- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("override, reason", [
    ("loss.cf=0.1", "set loss.cf=0"),
    ("scaling.workers=2", "one worker"),
    ("train.grad_accum=2", "grad_accum=1"),
    ("train.sparse_item_table=true", "sparse tables"),
    ("finetune.flow=whiten", "whiten"),
    ("finetune.keep_pretrained=true", "keep_pretrained"),
    ("finetune.init=random", "init=pretrained"),
    ("train.precision=bf16", "fp32"),
    ("loss.label_smoothing=0.1", "label_smoothing=0"),
    ("train.early_dropout=0.3 train.early_dropout_epochs=2", "unset train.early_dropout"),
])
def test_combinations_that_break_the_guarantee_are_refused(override, reason):
    overrides = override.split() + (["loss.softmax=sampled"] if "sparse" in override else [])
    with pytest.raises(ConfigKeyError, match=reason) as refused:
        _finetune("p", "d", "o", "finetune.privacy.epsilon=1", *overrides)
    assert refused.value.key == "finetune.privacy.epsilon" and "\n" not in str(refused.value)
    _finetune("p", "d", "o", *overrides) if "sparse" not in override else None  # fine without DP


def test_models_opacus_cannot_split_per_user_are_refused_in_full_mode():
    config = _finetune("p", "d", "o", "finetune.privacy.epsilon=1")
    for model, reason in ((ModelConfig(positions="last"), "positions=last"), (ModelConfig(encoder="gru"), "gru")):
        with pytest.raises(UserError, match=reason):
            check_private_model(FinetuneConfig(**{**config.__dict__, "model": model}))
    frozen = _finetune("p", "d", "o", "finetune.privacy.epsilon=1", "finetune.mode=frozen")
    check_private_model(FinetuneConfig(**{**frozen.__dict__, "model": ModelConfig(positions="last")}))


def test_privacy_settings_are_validated():
    for override, key in (("finetune.privacy.epsilon=0", "finetune.privacy.epsilon"),
                          ("finetune.privacy.delta=1", "finetune.privacy.delta"),
                          ("finetune.privacy.max_grad_norm=0", "finetune.privacy.max_grad_norm")):
        with pytest.raises(ConfigKeyError) as refused:
            _finetune("p", "d", "o", override)
        assert refused.value.key == key
    assert not _finetune("p", "d", "o").finetune.privacy.enabled
    assert os.environ.get("FLM_PSEUDONYM_KEY") != KEY.decode()


def test_an_empty_poisson_draw_is_a_noised_accounted_step():
    """What train_private does when Poisson sampling draws nobody: noise only, and the accountant counts it."""
    from flm_dist.train import private

    model = _tiny_recommender("frozen")
    weights = {"seq": 1.0, "fused": 1.0}
    private._trained_parameters(model, "frozen", weights, "all")
    before = model.head.linear.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    plan = PrivacyPlan(target_epsilon=1.0, delta=1e-3, max_grad_norm=1.0, accountant="rdp", users=4, sample_rate=0.25,
                       expected_batch_size=1, steps_per_epoch=4, planned_steps=4, noise_multiplier=1.0)
    engine, _, dp_optimizer, _ = attach_privacy(_PerUserLoss(model, weights, "all"), optimizer, plan, batch_size=1)
    for parameter in dp_optimizer.params:
        parameter.grad_sample = torch.zeros((0, *parameter.shape))
    dp_optimizer.step()
    assert engine.accountant.history == [(1.0, 0.25, 1)]
    assert not torch.equal(before, model.head.linear.weight)
