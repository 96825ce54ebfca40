import pytest
import torch

from flm_dist.bench.train import run_bench_train
from flm_dist.config import load_config
from flm_dist.train.configs import PretrainConfig
from flm_dist.train.kernels import choose_attention_kernel


@pytest.fixture
def restores_cudnn_attention():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


def test_gpu_steps_leave_cudnn_attention_out_unless_asked(restores_cudnn_attention):
    # torch's switch is a flag: it can be set and read without a GPU.
    assert choose_attention_kernel(torch.device("cuda"), cudnn=False) is False
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert choose_attention_kernel(torch.device("cuda", 0), cudnn=True) is True
    assert torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    assert choose_attention_kernel(torch.device("cpu"), cudnn=False) is False
    assert torch.backends.cuda.cudnn_sdp_enabled()  # a CPU worker leaves torch's choice alone


@pytest.mark.parametrize("cudnn", [False, True])
def test_training_setup_passes_the_config_to_the_kernel_choice(tiny_data, tmp_path, monkeypatch, cudnn):
    chosen = []
    monkeypatch.setattr("flm_dist.train.loop.choose_attention_kernel",
                        lambda device, cudnn: chosen.append((device.type, cudnn)))
    config = load_config(PretrainConfig, None, [f"data={tiny_data}", f"output={tmp_path}", "model.hidden=16",
                                                "model.max_len=12", "model.flow_hidden=16", "train.batch_size=32",
                                                f"train.cudnn_attention={str(cudnn).lower()}"])
    run_bench_train(config, steps=1, warmup=1)
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert chosen == [(expected_device, cudnn)]
