"""The frequency-filter mixers (model.mixer=bsarec|fmlp): the filter itself, padding and batch-width
invariance, and that training never lets a position see its own target."""

import pyarrow as pa
import pytest
import torch

from flm_dist.config import ConfigKeyError, ModelConfig, TrainConfig
from flm_dist.data.batches import build_train_arrays
from flm_dist.models import FLMModel, SequenceEncoder
from flm_dist.models.frequency import FrequencyFilter
from flm_dist.train.configs import FinetuneConfig, PretrainConfig

NUM_ITEMS = 30
HIDDEN = 16
MAX_LEN = 10
MIXERS = ["bsarec", "fmlp"]


def make_encoder(mixer: str, norm: str = "pre", **options) -> SequenceEncoder:
    torch.manual_seed(0)
    return SequenceEncoder(NUM_ITEMS, HIDDEN, MAX_LEN, layers=2, heads=2, dropout=0.1, positions="first",
                           norm=norm, mixer=mixer, **options).eval()


def short_rows(batch: int = 4, items: int = 6) -> torch.Tensor:
    """Rows of `items` real items (row 1: fewer), left-padded to MAX_LEN."""
    rows = torch.randint(1, NUM_ITEMS + 1, (batch, MAX_LEN), generator=torch.Generator().manual_seed(0))
    rows[:, :MAX_LEN - items] = 0
    rows[1, :MAX_LEN - 2] = 0
    return rows


def test_default_is_attention_with_the_same_weights():
    assert ModelConfig().mixer == "attention"
    keys = set(make_encoder("attention").state_dict())
    assert not any("filter" in key for key in keys)
    torch.manual_seed(0)
    default = SequenceEncoder(NUM_ITEMS, HIDDEN, MAX_LEN, layers=2, heads=2, dropout=0.1, positions="first").eval()
    assert set(default.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(default(short_rows()), make_encoder("attention")(short_rows()), atol=0, rtol=0)


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("mixer", MIXERS)
def test_states_depend_neither_on_batch_width_nor_on_padding_contents(mixer, norm):
    encoder = make_encoder(mixer, norm)
    rows = short_rows()
    real = rows != 0
    with torch.no_grad():
        full = encoder(rows)
        assert torch.isfinite(full).all()
        torch.testing.assert_close(encoder(rows[:, -6:]), full[:, -6:], atol=1e-5, rtol=0)
        encoder.item_embedding.weight[0] = torch.randn(HIDDEN) * 10
        torch.testing.assert_close(encoder(rows)[real], full[real], atol=1e-5, rtol=0)
    assert ("qkv" in str(list(encoder.state_dict()))) == (mixer == "bsarec")


def test_bsarec_filter_is_low_pass_plus_scaled_high_pass():
    signal = torch.randn(3, MAX_LEN, HIDDEN)
    every = torch.ones(3, MAX_LEN, dtype=torch.bool)
    dc_only = FrequencyFilter("bsarec", HIDDEN, MAX_LEN, cutoff=1)  # c // 2 + 1 = 1 bin: the mean
    with torch.no_grad():
        dc_only.sqrt_beta.zero_()
        torch.testing.assert_close(dc_only(signal, every), signal.mean(1, keepdim=True).expand_as(signal))
        dc_only.sqrt_beta.fill_(2.0)  # beta = 4
        mean = signal.mean(1, keepdim=True)
        torch.testing.assert_close(dc_only(signal, every), mean + 4 * (signal - mean))
        every_bin = FrequencyFilter("bsarec", HIDDEN, MAX_LEN, cutoff=MAX_LEN)
        every_bin.sqrt_beta.zero_()
        torch.testing.assert_close(every_bin(signal, every), signal, atol=1e-5, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dc_only(signal.bfloat16(), every).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", MIXERS)
def test_filters_equal_the_fft_of_the_zero_padded_window(kind):
    # BSARec's FrequencyLayer and FMLP-Rec's FMLPRecLayer, written as their code does it, on rows
    # zero-padded on the left to MAX_LEN; the module only receives the batch's last 6 positions.
    torch.manual_seed(1)
    module = FrequencyFilter(kind, HIDDEN, MAX_LEN, cutoff=4)
    rows = torch.randn(3, 6, HIDDEN)
    is_item = torch.ones(3, 6, dtype=torch.bool)
    is_item[0, :2] = False
    window = torch.nn.functional.pad(rows * is_item.unsqueeze(-1), (0, 0, MAX_LEN - 6, 0))
    spectrum = torch.fft.rfft(window, dim=1, norm="ortho")
    if kind == "bsarec":
        spectrum[:, 4 // 2 + 1:] = 0
        low = torch.fft.irfft(spectrum, n=MAX_LEN, dim=1, norm="ortho")
        expected = low + module.sqrt_beta ** 2 * (window - low)
    else:
        expected = torch.fft.irfft(spectrum * torch.view_as_complex(module.spectrum_weight), n=MAX_LEN, dim=1,
                                   norm="ortho")
    with torch.no_grad():
        torch.testing.assert_close(module(rows, is_item), expected[:, -6:], atol=1e-5, rtol=1e-5)


def later_items_reach_trained_states(encoder: SequenceEncoder, input: torch.Tensor, target: torch.Tensor) -> bool:
    """Does the state at some position with a target change when an item after that position
    changes? Then training at that position would see its target (or what follows it)."""
    with torch.no_grad():
        original = encoder(input)
        for row, position in (target != 0).nonzero().tolist():
            for later in range(position + 1, input.shape[1]):
                changed = input.clone()
                changed[row, later] = changed[row, later] % NUM_ITEMS + 1
                if (encoder(changed)[row, position] - original[row, position]).abs().max() > 1e-6:
                    return True
    return False


@pytest.mark.parametrize("mixer", ["attention", *MIXERS])
@pytest.mark.parametrize("windows", ["all", "prefixes"])
def test_training_positions_never_see_later_items_under_the_allowed_windows(mixer, windows):
    sequences = [[3, 7, 1, 9, 4, 12, 5], [2, 8], [11, 6, 13, 2, 15, 1, 7, 22, 14, 3, 18, 9]]
    table = pa.table({"user": pa.array(range(3), pa.int32()), "items": pa.array(sequences, pa.list_(pa.int32()))})
    arrays = build_train_arrays(table, MAX_LEN, windows=windows)
    # Prefix windows carry a target at the last position only; the loss reads just that one.
    leaks = later_items_reach_trained_states(make_encoder(mixer), arrays.input, arrays.target)
    allowed = mixer == "attention" or windows == "prefixes"
    assert leaks == (not allowed)
    settings = {"data": "d", "output": "o", "model": ModelConfig(mixer=mixer), "train": TrainConfig(windows=windows)}
    if allowed:
        PretrainConfig(**settings)
    else:
        with pytest.raises(ConfigKeyError, match="model.mixer.*windows=prefixes"):
            PretrainConfig(**settings)


def test_finetuning_a_filter_model_also_needs_prefix_windows():
    with pytest.raises(ConfigKeyError, match="model.mixer"):
        FinetuneConfig(pretrained="p", data="d", output="o", model=ModelConfig(mixer="bsarec"))
    FinetuneConfig(pretrained="p", data="d", output="o", model=ModelConfig(mixer="bsarec"),
                   train=TrainConfig(windows="prefixes"))


@pytest.mark.parametrize("settings, key", [({"mixer": "fmlp", "encoder": "gru"}, "mixer"),
                                           ({"filter_alpha": 1.5}, "filter_alpha"),
                                           ({"filter_cutoff": 0}, "filter_cutoff"),
                                           ({"filter_cutoff": 51}, "filter_cutoff")])
def test_bad_filter_settings_name_the_key(settings, key):
    with pytest.raises(ConfigKeyError, match=f"'{key}'"):
        ModelConfig(**settings)


@pytest.mark.parametrize("mixer", MIXERS)
def test_filter_models_train_under_bf16_with_gradients_on_the_filter(mixer):
    torch.manual_seed(0)
    model = FLMModel(num_users=4, num_items=NUM_ITEMS, hidden=HIDDEN, max_len=MAX_LEN, layers=2, heads=2,
                     dropout=0.1, positions="first", mixer=mixer, filter_alpha=0.5, filter_cutoff=3)
    input = short_rows()
    batch = {"user": torch.arange(4), "input": input, "target": torch.nn.functional.pad(input[:, 1:], (0, 1), value=5)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = model.losses(batch, {"seq": 1.0}, seq_positions="last")
    terms["total"].backward()
    assert torch.isfinite(terms["total"])
    filter_grads = [p.grad for name, p in model.named_parameters() if ".filter." in name]
    assert len(filter_grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in filter_grads)
