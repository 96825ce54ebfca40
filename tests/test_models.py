"""Sequence encoders, CF (MF and history), the joint FLM model: shapes, causality, padding, tying,
losses."""

import math

import pytest
import torch

from flm_dist.models import FLMModel, MatrixFactorization, NormalizingFlow, SequenceEncoder
from flm_dist.models.cf import HistoryCF
from flm_dist.models.losses import ItemDistribution, full_softmax_ce, intent_info_nce, two_view_info_nce

NUM_USERS = 12
NUM_ITEMS = 30
HIDDEN = 16
MAX_LEN = 10
ENCODERS = ["sasrec", "gru", "lstm"]
# Encoder kinds and SASRec's options (`kind[:positions][:norm]`) for the structural checks.
ENCODER_VARIANTS = ["sasrec", "sasrec:first", "sasrec:last:post", "sasrec:first:post", "gru", "lstm"]
ALL_WEIGHTS = {"seq": 1.0, "cf": 0.5, "fused": 0.25, "flow": 0.1}



def make_encoder(variant: str, positions: str = "last", norm: str = "pre") -> SequenceEncoder:
    """`variant`: an encoder kind, optionally with SASRec's options, as in "sasrec:first:post"."""
    kind, *options = variant.split(":")
    positions = options[0] if options else positions
    norm = options[1] if len(options) > 1 else norm
    torch.manual_seed(0)
    return SequenceEncoder(NUM_ITEMS, HIDDEN, MAX_LEN, layers=2, heads=2, dropout=0.1,
                           kind=kind, positions=positions, norm=norm).eval()


def make_model(**overrides) -> FLMModel:
    torch.manual_seed(0)
    options = dict(num_users=NUM_USERS, num_items=NUM_ITEMS, hidden=HIDDEN, max_len=MAX_LEN,
                   layers=2, heads=2, dropout=0.0, flow_layers=2, flow_hidden=16)
    options.update(overrides)
    return FLMModel(**options)


def left_padded_input(batch: int = 5, length: int = MAX_LEN, seed: int = 0) -> torch.Tensor:
    """Rows with 0, 1, 3, ... leading pads; row 0 is entirely padding."""
    generator = torch.Generator().manual_seed(seed)
    items = torch.randint(1, NUM_ITEMS + 1, (batch, length), generator=generator)
    pads = [length, 0, 1, 3, length - 2, 4, 2, 0][:batch]
    for row, count in enumerate(pads):
        items[row, :count] = 0
    return items


def make_batch(batch: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Next-item batch: target[t] = input[t + 1], the last target is a held-out next item."""
    generator = torch.Generator().manual_seed(seed)
    full = left_padded_input(batch, MAX_LEN + 1, seed)
    full[0, -3:] = torch.randint(1, NUM_ITEMS + 1, (3,), generator=generator)  # a short history
    return {
        "user": torch.randint(0, NUM_USERS, (batch,), generator=generator),
        "input": full[:, :-1],
        "target": full[:, 1:] * (full[:, :-1] != 0),
    }


# --- Sequence encoders ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ENCODER_VARIANTS)
def test_encoder_shapes_and_fully_padded_row_is_finite(kind):
    encoder = make_encoder(kind)
    states = encoder(left_padded_input())
    assert states.shape == (5, MAX_LEN, HIDDEN)
    assert torch.isfinite(states).all()
    shorter = encoder(left_padded_input(length=4))
    assert shorter.shape == (5, 4, HIDDEN)
    assert torch.isfinite(encoder(torch.zeros(3, MAX_LEN, dtype=torch.long))).all()


@pytest.mark.parametrize("kind", ENCODER_VARIANTS)
def test_no_future_leakage(kind):
    encoder = make_encoder(kind)
    input = left_padded_input()
    with torch.no_grad():
        original = encoder(input)
        for position in (2, 5, MAX_LEN - 1):
            changed = input.clone()
            changed[:, position] = changed[:, position] % NUM_ITEMS + 1  # another real item
            states = encoder(changed)
            torch.testing.assert_close(states[:, :position], original[:, :position],
                                       atol=1e-6, rtol=0)
            # The change must be visible from its own position on, or the check above is vacuous.
            assert (states[1:, position] - original[1:, position]).abs().amax() > 1e-3


@pytest.mark.parametrize("kind", ENCODER_VARIANTS)
def test_padding_row_contents_never_reach_real_positions(kind):
    encoder = make_encoder(kind)
    input = left_padded_input()
    with torch.no_grad():
        original = encoder(input)
        encoder.item_embedding.weight[0] = torch.randn(HIDDEN) * 10
        changed = encoder(input)
    real = input != 0
    torch.testing.assert_close(changed[real], original[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("positions", ["first", "last"])
def test_sasrec_position_ids_do_not_depend_on_padding(positions):
    encoder = make_encoder("sasrec", positions)
    history = torch.randint(1, NUM_ITEMS + 1, (2, 4), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([torch.zeros(2, MAX_LEN - 4, dtype=torch.long), history], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(encoder(padded)[:, -4:], encoder(history), atol=1e-5, rtol=0)


@pytest.mark.parametrize("positions", ["first", "last"])
def test_a_trained_inner_position_is_the_ranked_prefix_only_when_counted_from_the_first_item(positions):
    # Position t of a training row predicts item t+1; at ranking time the same prefix is a row of
    # its own whose last position is scored.
    encoder = make_encoder("sasrec", positions)
    row = torch.randint(1, NUM_ITEMS + 1, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        inner = encoder(row)[0, 3]
        ranked = encoder(torch.cat([torch.zeros(1, 3, dtype=torch.long), row[:, :4]], dim=1))[0, -1]
    assert torch.allclose(inner, ranked, atol=1e-5) == (positions == "first")


def test_encoder_rejects_bad_configuration():
    with pytest.raises(ValueError, match="divisible"):
        SequenceEncoder(NUM_ITEMS, HIDDEN, MAX_LEN, layers=1, heads=3, dropout=0.0)
    with pytest.raises(ValueError, match="unknown encoder kind"):
        SequenceEncoder(NUM_ITEMS, HIDDEN, MAX_LEN, layers=1, heads=2, dropout=0.0, kind="bert")
    with pytest.raises(ValueError, match="item_embedding"):
        SequenceEncoder(NUM_ITEMS, HIDDEN, MAX_LEN, layers=1, heads=2, dropout=0.0,
                        item_embedding=torch.nn.Embedding(NUM_ITEMS, HIDDEN))
    with pytest.raises(ValueError, match="max_len"):
        make_encoder("gru")(torch.ones(1, MAX_LEN + 1, dtype=torch.long))


# --- Weight tying --------------------------------------------------------------------------------

def test_item_table_is_one_shared_object_and_cf_gradient_reaches_it():
    model = make_model()
    assert model.cf.item_embedding is model.item_embedding
    assert model.sequence.item_embedding is model.item_embedding
    assert isinstance(model.cf, MatrixFactorization) and isinstance(model.flow, NormalizingFlow)
    shared = [p for p in model.parameters() if p is model.item_embedding.weight]
    assert len(shared) == 1  # counted once, so optimisers and DDP see a single tensor

    batch = make_batch()
    model.losses(batch, {"cf": 1.0})["total"].backward()
    gradient = model.item_embedding.weight.grad
    targeted = batch["target"][batch["target"] != 0].unique()
    assert gradient[targeted].abs().sum(-1).min() > 0
    assert torch.all(gradient[0] == 0)


def test_history_cf_is_the_projected_mean_of_the_items_seen_so_far():
    model = make_model(cf_user="history").eval()
    assert isinstance(model.cf, HistoryCF) and model.cf.item_embedding is model.item_embedding
    assert not any("user" in name for name, _ in model.named_parameters())  # no row per user
    input = left_padded_input()
    users = torch.arange(5)
    with torch.no_grad():
        prefix = model.cf.prefix_vectors(users, input)
        table, projection = model.item_table(), model.cf.projection
        for row in range(5):
            for position in range(MAX_LEN):
                seen = input[row, :position + 1]
                seen = seen[seen != 0]
                mean = table[seen].mean(0) if len(seen) else torch.zeros(HIDDEN)
                torch.testing.assert_close(prefix[row, position], projection(mean))
        torch.testing.assert_close(model.cf.user_vectors(users, input), prefix[:, -1])
        # The user id is not an input; a later item never changes an earlier position.
        torch.testing.assert_close(model.cf.prefix_vectors(users.flip(0), input), prefix)
        changed = input.clone()
        changed[:, 6:] = changed[:, 6:] % NUM_ITEMS + 1
        later = model.cf.prefix_vectors(users, changed)
    torch.testing.assert_close(later[:, :6], prefix[:, :6])
    assert not torch.allclose(later[1:, 6:], prefix[1:, 6:])


@pytest.mark.parametrize("seq_positions", ["all", "last"])
def test_history_cf_loss_terms_match_their_definitions(seq_positions):
    model = make_model(cf_user="history").eval()
    batch = make_batch()
    terms = model.losses(batch, ALL_WEIGHTS, seq_positions=seq_positions)
    table, target = model.item_table(), batch["target"]
    prefix = model.cf.prefix_vectors(batch["user"], batch["input"])
    if seq_positions == "last":
        cf = full_softmax_ce(prefix[:, -1], table, target[:, -1])
    else:
        cf = full_softmax_ce(prefix.reshape(-1, HIDDEN), table, target.reshape(-1))
    fused_vectors = model.fusion(prefix[:, -1], model.sequence_states(batch["input"])[:, -1])
    torch.testing.assert_close(fused_vectors, model.user_representation(batch["user"], batch["input"], "fused"))
    torch.testing.assert_close(terms["cf"], cf)
    torch.testing.assert_close(terms["fused"], full_softmax_ce(fused_vectors, table, target[:, -1]))


# --- Joint model losses --------------------------------------------------------------------------

@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("fusion", ["concat", "sum", "gate"])
def test_losses_returns_every_term_and_weighted_total(encoder, fusion):
    model = make_model(encoder=encoder, fusion=fusion, flow_kind="spline")
    terms = model.losses(make_batch(), ALL_WEIGHTS)
    assert set(terms) == {"seq", "cf", "fused", "flow", "total"}
    assert all(torch.isfinite(value) and value.dim() == 0 for value in terms.values())
    expected = sum(weight * terms[name] for name, weight in ALL_WEIGHTS.items())
    torch.testing.assert_close(terms["total"], expected)
    terms["total"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_prefix_windows_train_the_same_next_item_loss_as_whole_windows():
    """With positions counted from the first item, the state after item t of a whole window is
    the last state of the prefix ending at t, so (without dropout) scoring only the last
    position of every prefix window gives exactly the whole windows' next-item loss."""
    import pyarrow as pa

    from flm_dist.data.batches import build_train_arrays

    generator = torch.Generator().manual_seed(3)
    sequences = [torch.randint(1, NUM_ITEMS + 1, (n,), generator=generator).tolist() for n in (2, 5, MAX_LEN + 1)]
    table = pa.table({"user": pa.array(range(len(sequences)), pa.int32()),
                      "items": pa.array(sequences, pa.list_(pa.int32()))})
    whole = build_train_arrays(table, MAX_LEN, windows="all")
    prefixes = build_train_arrays(table, MAX_LEN, windows="prefixes")
    assert len(whole) == 3 and len(prefixes) == sum(len(s) - 1 for s in sequences)
    model = make_model(positions="first").eval()
    weights = {"seq": 1.0}
    expected = model.losses(whole.take(torch.arange(len(whole))), weights)["seq"]
    last_only = model.losses(prefixes.take(torch.arange(len(prefixes))), weights, seq_positions="last")["seq"]
    torch.testing.assert_close(last_only, expected)
    every_position = model.losses(prefixes.take(torch.arange(len(prefixes))), weights)["seq"]
    torch.testing.assert_close(every_position, expected)  # the other positions carry no target


@pytest.mark.parametrize("variant", ENCODER_VARIANTS + ["sasrec:first:pre:bsarec", "sasrec:first:post:fmlp"])
def test_a_last_state_pass_gives_the_last_state_and_its_gradients(variant):
    """`last_only` skips the last block's work for the other positions: the same last state and
    the same gradients (no dropout) as the full pass read at its last position."""
    kind, *options = variant.split(":")
    positions, norm, mixer = (options + ["last", "pre", "attention"][len(options):])[:3]
    torch.manual_seed(0)
    encoder = SequenceEncoder(NUM_ITEMS, HIDDEN, MAX_LEN, layers=2, heads=2, dropout=0.3, kind=kind,
                              positions=positions, norm=norm, mixer=mixer).eval()
    input = left_padded_input(8)
    full, last = encoder(input), encoder(input, last_only=True)
    assert last.shape == (8, 1, HIDDEN)
    torch.testing.assert_close(last, full[:, -1:])
    parameters = list(encoder.parameters())
    expected = torch.autograd.grad(full[:, -1].pow(2).sum(), parameters, allow_unused=True)
    got = torch.autograd.grad(last[:, -1].pow(2).sum(), parameters, allow_unused=True)
    for name, want, have in zip([name for name, _ in encoder.named_parameters()], expected, got):
        assert (want is None) == (have is None), name
        if want is not None:
            torch.testing.assert_close(have, want, msg=name)


def test_prefix_windows_run_the_last_blocks_feed_forward_on_the_last_position_only():
    model = make_model(positions="first")
    shapes = []
    model.sequence.blocks[-1].feedforward.register_forward_hook(lambda module, args, out: shapes.append(args[0].shape))
    model.losses(make_batch(), {"seq": 1.0}, seq_positions="last")
    model.losses(make_batch(), {"seq": 1.0})
    assert shapes == [(8, 1, HIDDEN), (8, MAX_LEN, HIDDEN)]


@pytest.mark.parametrize("cf_user", ["table", "history"])
@pytest.mark.parametrize("cf_loss", ["ce", "bpr"])
@pytest.mark.parametrize("softmax", ["full", "sampled"])
def test_loss_options_give_finite_losses_with_gradients(cf_user, cf_loss, softmax):
    model = make_model(cf_user=cf_user)
    terms = model.losses(make_batch(), ALL_WEIGHTS, cf_loss=cf_loss, softmax=softmax,
                         num_negatives=7, popularity=ItemDistribution.from_log_weights(torch.randn(NUM_ITEMS + 1)))
    assert all(torch.isfinite(value) for value in terms.values())
    terms["total"].backward()
    user_part = model.cf.user_embedding if cf_user == "table" else model.cf.projection
    assert user_part.weight.grad.abs().sum() > 0


def test_history_cf_bpr_compares_each_position_with_shared_negatives():
    model = make_model(cf_user="history").eval()
    batch = make_batch()
    torch.manual_seed(5)
    term = model.losses(batch, {"cf": 1.0}, cf_loss="bpr", num_negatives=7)["cf"]
    torch.manual_seed(5)
    negatives = torch.randint(1, NUM_ITEMS + 1, (8 * 7,)).view(8, 7)
    prefix, table, target = model.cf.prefix_vectors(batch["user"], batch["input"]), model.item_table(), batch["target"]
    positive = (prefix * table[target]).sum(-1)
    negative = torch.einsum("blh,bkh->blk", prefix, table[negatives])
    per_pair = -torch.nn.functional.logsigmoid(positive[..., None] - negative).mean(-1)
    torch.testing.assert_close(term, per_pair[target != 0].mean())


@pytest.mark.parametrize("cf_user", ["table", "history"])
@pytest.mark.parametrize("cf_loss", ["ce", "bpr"])
def test_sparse_item_table_gradient_is_the_dense_gradient_of_the_rows_looked_up(cf_user, cf_loss):
    gradients = []
    for sparse in (False, True):
        model = make_model(cf_user=cf_user)
        model.item_embedding.sparse = sparse
        torch.manual_seed(1)  # the same sampled negatives for both
        model.losses(make_batch(), ALL_WEIGHTS, cf_loss=cf_loss, softmax="sampled", num_negatives=7)["total"].backward()
        gradients.append(model.item_table().grad)
    dense, sparse = gradients
    assert not dense.is_sparse and sparse.is_sparse
    torch.testing.assert_close(sparse.to_dense(), dense)


def test_model_without_flow_layers_scores_representations_under_a_standard_normal():
    model = make_model(flow_layers=0)
    batch = make_batch()
    terms = model.losses(batch, ALL_WEIGHTS)
    fused = model.user_representation(batch["user"], batch["input"], "fused")
    standard_normal = torch.distributions.Normal(0.0, 1.0).log_prob(fused).sum(-1)
    torch.testing.assert_close(terms["flow"], -standard_normal.mean() / HIDDEN)


def test_zero_weight_terms_are_skipped_and_unknown_weights_rejected():
    model = make_model()
    terms = model.losses(make_batch(), {"seq": 1.0, "cf": 0.0})
    assert set(terms) == {"seq", "total"}
    torch.testing.assert_close(terms["total"], terms["seq"])
    with pytest.raises(ValueError, match="unknown loss weights"):
        model.losses(make_batch(), {"sequence": 1.0})
    with pytest.raises(ValueError, match="every loss weight is zero"):
        model.losses(make_batch(), {"seq": 0.0})


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_terms_match_their_definitions(smoothing):
    model = make_model().eval()
    batch = make_batch()
    terms = model.losses(batch, ALL_WEIGHTS, label_smoothing=smoothing)
    table = model.item_table()
    states = model.sequence_states(batch["input"])
    cf_vectors = model.cf.user_vectors(batch["user"], batch["input"])
    length = batch["target"].shape[1]

    seq = full_softmax_ce(states.reshape(-1, HIDDEN), table, batch["target"].reshape(-1), None, smoothing)
    # CF CE with one log-partition per user equals the naive per-position softmax.
    cf = full_softmax_ce(cf_vectors.repeat_interleave(length, 0), table,
                         batch["target"].reshape(-1), None, smoothing)
    fused_vectors = model.user_representation(batch["user"], batch["input"], "fused")
    fused = full_softmax_ce(fused_vectors, table, batch["target"][:, -1], None, smoothing)
    flow = -model.flow.log_prob(fused_vectors).mean() / HIDDEN
    for name, expected in {"seq": seq, "cf": cf, "fused": fused, "flow": flow}.items():
        torch.testing.assert_close(terms[name], expected, msg=name)


def test_contrast_term_compares_two_dropout_passes_of_the_encoder():
    model = make_model(dropout=0.3).train()
    batch = make_batch()
    weights = {"seq": 1.0, "contrast": 0.5}
    torch.manual_seed(3)
    terms = model.losses(batch, weights, contrast_temperature=2.0)
    torch.manual_seed(3)  # replay the two passes' dropout masks
    first = model.sequence_states(batch["input"])[:, -1]
    second = model.sequence_states(batch["input"], last_only=True)[:, -1]  # the positive: a last-state pass
    assert not torch.allclose(first, second)  # the masks differ: two views, not one
    expected = two_view_info_nce(first, second, batch["target"][:, -1], temperature=2.0)
    torch.testing.assert_close(terms["contrast"], expected)
    torch.testing.assert_close(terms["total"], terms["seq"] + 0.5 * terms["contrast"])
    model.zero_grad()
    terms["contrast"].backward()
    assert model.item_embedding.weight.grad.abs().sum() > 0


def test_intent_term_contrasts_the_last_state_with_the_batch_centroids():
    model = make_model(dropout=0.0).train()
    batch = make_batch()
    batch["intent_centroids"] = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(1))
    terms = model.losses(batch, {"seq": 1.0, "intent": 0.3}, intent_temperature=0.5)
    last = model.sequence_states(batch["input"])[:, -1]
    expected = intent_info_nce(last, batch["intent_centroids"], batch["target"][:, -1], 0.5)
    torch.testing.assert_close(terms["intent"], expected)
    torch.testing.assert_close(terms["total"], terms["seq"] + 0.3 * terms["intent"])
    model.zero_grad()
    terms["intent"].backward()
    assert model.item_embedding.weight.grad.abs().sum() > 0


def test_contrast_term_takes_its_positive_from_contrast_input_when_the_batch_has_one():
    model = make_model(dropout=0.3).train()
    batch = make_batch()
    batch["contrast_input"] = make_batch(seed=1)["input"]
    torch.manual_seed(3)
    terms = model.losses(batch, {"seq": 1.0, "contrast": 1.0})
    torch.manual_seed(3)
    first = model.sequence_states(batch["input"])[:, -1]
    positive = model.sequence_states(batch["contrast_input"], last_only=True)[:, -1]
    torch.testing.assert_close(terms["contrast"], two_view_info_nce(first, positive, batch["target"][:, -1]))
    # The same positives in runs of rows, each run cut to its own width (left padding only); no
    # dropout, whose masks would follow the shapes.
    model = make_model(dropout=0.0).train()
    partners = batch["contrast_input"][(batch["contrast_input"] != 0).sum(dim=1).argsort()]
    batch["contrast_input"] = partners
    runs = (partners[:3, -int((partners[:3] != 0).sum(dim=1).max()):], partners[3:])
    whole = model.losses(batch, {"seq": 1.0, "contrast": 1.0})
    in_runs = model.losses({**batch, "contrast_input": runs}, {"seq": 1.0, "contrast": 1.0})
    assert runs[0].shape[1] < partners.shape[1]
    torch.testing.assert_close(in_runs["contrast"], whole["contrast"])


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_flow_stop_gradient_keeps_flow_loss_off_the_encoders(stop_gradient):
    model = make_model(flow_stop_gradient=stop_gradient)
    model.losses(make_batch(), {"flow": 1.0})["total"].backward()
    flow_parameters = {id(p) for p in model.flow.parameters()}
    encoder_gradients = [p.grad for p in model.parameters() if id(p) not in flow_parameters]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.flow.parameters())
    reached = [g is not None and g.abs().sum() > 0 for g in encoder_gradients]
    assert not any(reached) if stop_gradient else all(reached)


# --- Scoring and representations -----------------------------------------------------------------

@pytest.mark.parametrize("source", ["fused", "sequence", "cf"])
def test_score_all_excludes_padding_and_matches_dot_products(source):
    model = make_model().eval()
    batch = make_batch()
    with torch.no_grad():
        scores = model.score_all(batch["user"], batch["input"], source)
        representation = model.user_representation(batch["user"], batch["input"], source)
    assert scores.shape == (8, NUM_ITEMS + 1)
    assert torch.all(scores[:, 0] == -math.inf)
    torch.testing.assert_close(scores[:, 1:], representation @ model.item_table()[1:].T)
    assert torch.all(scores.argmax(1) > 0)


def test_representation_sources_and_flow_outputs():
    model = make_model().eval()
    batch = make_batch()
    with torch.no_grad():
        model.initialize_flow(batch)
        sequence = model.user_representation(batch["user"], batch["input"], "sequence")
        cf = model.user_representation(batch["user"], batch["input"], "cf")
        latent = model.flow_latent(batch["user"], batch["input"])
        log_density = model.flow_log_density(batch["user"], batch["input"])
    torch.testing.assert_close(sequence, model.sequence_states(batch["input"])[:, -1])
    torch.testing.assert_close(cf, model.cf.user_vectors(batch["user"], batch["input"]))
    assert latent.shape == (8, HIDDEN) and log_density.shape == (8,)
    # The init batch is standardised by the first ActNorm, and the density is finite.
    assert torch.isfinite(log_density).all()
    assert all(bool(step.initialized) for step in model.flow.steps if hasattr(step, "initialized"))
    with pytest.raises(ValueError, match="unknown source"):
        model.user_representation(batch["user"], batch["input"], "item")


def test_linear_user_head_starts_as_the_identity_and_its_bias_scores_items_alike_for_every_user():
    plain, headed = make_model().eval(), make_model(user_head="linear").eval()
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(headed.sequence_states(batch["input"]), plain.sequence_states(batch["input"]))
        popularity = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1))
        headed.sequence_head.bias.copy_(popularity)
        shift = (headed.score_all(batch["user"], batch["input"], "sequence")
                 - plain.score_all(batch["user"], batch["input"], "sequence"))[:, 1:]
    # The bias adds b . e_i to item i's score, the same for every user: a popularity term.
    expected = (headed.item_table()[1:] @ popularity).expand_as(shift)
    torch.testing.assert_close(shift, expected)
    headed.train().losses(batch, {"seq": 1.0, "fused": 1.0})["total"].backward()
    assert headed.sequence_head.weight.grad.abs().sum() > 0 and headed.sequence_head.bias.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown user_head"):
        make_model(user_head="mlp")


def test_bf16_autocast_losses_are_finite_and_flow_is_fp32():
    model = make_model()
    batch = make_batch()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        terms = model.losses(batch, ALL_WEIGHTS)
        log_density = model.flow_log_density(batch["user"], batch["input"])
    assert all(torch.isfinite(value) for value in terms.values())
    assert terms["flow"].dtype == log_density.dtype == torch.float32
    terms["total"].backward()
    assert torch.isfinite(model.item_embedding.weight.grad).all()


def test_initialize_normal_redraws_the_sasrec_parts_and_keeps_the_identity_starts():
    num_items, hidden = 400, 32
    attributes = torch.tensor([[0, 0]] + [[1 + i % 5, 6 + i % 3] for i in range(num_items)])
    options = dict(num_users=NUM_USERS, num_items=num_items, hidden=hidden, max_len=MAX_LEN, layers=2, heads=2,
                   dropout=0.0, flow_layers=2, flow_hidden=16, item_features="concat", item_attributes=attributes,
                   num_attributes=8)
    torch.manual_seed(0)
    default = FLMModel(**options)
    torch.manual_seed(0)
    model = FLMModel(**options)
    model.initialize_normal(0.02)
    tables = [model.item_embedding, model.sequence.position_embedding,
              model.item_features.attributes.attribute_embedding]
    for table in tables:
        rows = table.weight[1:] if table.padding_idx is not None else table.weight
        assert 0.015 < rows.std().item() < 0.025
    assert not model.item_embedding.weight[0].any() and not tables[2].weight[0].any()
    redrawn = [name for name, module in model.sequence.named_modules()
               if isinstance(module, torch.nn.Linear) and not name.startswith("item_embedding")]
    assert len(redrawn) == 2 * 4  # qkv, attention output and the two feed-forward layers of each block
    for name in redrawn:
        module = model.sequence.get_submodule(name)
        assert not module.bias.any() and 0.015 < module.weight.std().item() < 0.025, name
    kept = {name: value for name, value in default.state_dict().items()
            if name.startswith(("flow.", "cf.user_embedding", "fusion.", "item_features.projection"))}
    assert any(name.startswith("item_features.projection") for name in kept)
    for name, value in kept.items():
        assert torch.equal(model.state_dict()[name], value), name


@pytest.mark.parametrize("variant", [*ENCODER_VARIANTS, "sasrec:first:pre:bsarec"])
def test_padding_columns_before_every_history_change_no_state_of_a_left_padding_free_encoder(variant):
    kind, *options = variant.split(":")
    mixer = options[2] if len(options) > 2 else "attention"
    torch.manual_seed(0)
    encoder = SequenceEncoder(NUM_ITEMS, HIDDEN, MAX_LEN, layers=2, heads=2, dropout=0.1, kind=kind,
                              positions=options[0] if options else "last", norm=options[1] if len(options) > 1 else "pre",
                              mixer=mixer).eval()
    input = left_padded_input(batch=4, seed=5)
    input[:, :3] = 0  # three columns of padding in every row
    assert encoder.left_padding_free == (kind == "sasrec")
    if encoder.left_padding_free:
        torch.testing.assert_close(encoder(input[:, 3:])[:, -1], encoder(input)[:, -1], rtol=1e-5, atol=1e-6)
    else:  # a recurrent state drifts over padding, so evaluation never cuts it
        assert not torch.allclose(encoder(input[:, 3:])[:, -1], encoder(input)[:, -1], atol=1e-4)


def test_bit_dropout_drops_at_the_rate_asked_and_rescales_the_rest():
    from flm_dist.models.dropout import bit_dropout

    torch.manual_seed(0)
    x = torch.ones(400_000)
    for p in (0.5, 0.2):
        out = bit_dropout(x, p)
        kept = out != 0
        assert abs(1 - kept.float().mean().item() - p) < 0.003
        assert torch.allclose(out[kept], torch.full_like(out[kept], 65536 / (65536 - round(p * 65536))))
        assert abs(out.mean().item() - 1) < 0.005  # unbiased
    assert torch.equal(bit_dropout(x[:10], 1 - 1e-6), torch.zeros(10))  # rounds to 1: all dropped
    assert torch.equal(bit_dropout(x[:10], 1e-6), x[:10])  # rounds to 0: none
    torch.manual_seed(1)
    first = bit_dropout(x[:1000], 0.5)
    torch.manual_seed(1)
    assert torch.equal(first, bit_dropout(x[:1000], 0.5))  # from torch's seeded generator


def test_bit_dropout_gradient_is_the_mask():
    from flm_dist.models.dropout import Dropout, set_dropout_masks

    layer = Dropout(0.5)
    set_dropout_masks(layer, "bits")
    x = torch.randn(64, 33, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert torch.equal(x.grad, (out != 0).float() * 2.0)
    layer.eval()
    assert layer(x) is x


def test_bits_masks_change_training_only_and_attention_matches_the_fused_kernel():
    from flm_dist.models.dropout import Dropout, attention, set_dropout_masks

    torch.manual_seed(0)
    query, key, value = torch.randn(3, 4, 2, 7, 8).unbind(0)
    allowed = torch.ones(7, 7, dtype=torch.bool).tril().expand(4, 1, 7, 7)
    dropout = Dropout(0.0)
    set_dropout_masks(dropout, "bits")
    dropout.p = 1e-9  # takes the explicit path (p > 0) yet drops nothing at 16-bit resolution
    explicit = attention(query, key, value, allowed, dropout)
    dropout.eval()
    fused = attention(query, key, value, allowed, dropout)
    assert torch.allclose(explicit, fused, atol=1e-5)

    model = FLMModel(num_users=5, num_items=30, hidden=16, max_len=8, layers=2, heads=2, dropout=0.5)
    set_dropout_masks(model, "bits")
    batch = torch.randint(1, 31, (6, 8))
    model.eval()
    reference = model.sequence_states(batch)
    set_dropout_masks(model, "bernoulli")
    assert torch.equal(model.sequence_states(batch), reference)  # evaluation never draws masks
    model.train()
    set_dropout_masks(model, "bits")
    assert not torch.allclose(model.sequence_states(batch), reference)
    with pytest.raises(ValueError, match="dropout masks"):
        set_dropout_masks(model, "uniform")


@pytest.mark.gpu
def test_bits_masks_leave_gpu_tensors_to_torch():
    from flm_dist.models.dropout import Dropout, set_dropout_masks

    layer = Dropout(0.5)
    set_dropout_masks(layer, "bits")
    x = torch.ones(10_000, device="cuda")
    torch.manual_seed(0)
    ours = layer(x)
    torch.manual_seed(0)
    assert torch.equal(ours, torch.nn.functional.dropout(x, 0.5, training=True))
