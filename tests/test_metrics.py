"""Tests for npu_cache_fx.metrics."""

import math

import pytest
import torch

pytestmark = pytest.mark.slow  # real pipelines, trained models or searches: not in the quick tier

torch.set_num_threads(1)

from npu_cache_fx import metrics  # noqa: E402
from npu_cache_fx.models import digits  # noqa: E402
from npu_cache_fx.models.data import load_digits_16, make_clips, split_indices  # noqa: E402


def test_mse_known_values():
    a = torch.zeros(2, 3)
    b = torch.tensor([[1.0, -1.0, 2.0], [0.0, 0.0, 0.0]])
    assert metrics.mse(a, b) == pytest.approx(6.0 / 6.0)
    assert metrics.mse(b, a) == metrics.mse(a, b)
    assert metrics.mse(torch.ones(5), torch.ones(5)) == 0.0
    with pytest.raises(ValueError):
        metrics.mse(torch.zeros(2), torch.zeros(3))


def test_sample_mse_known_values():
    a = torch.zeros(2, 3)
    b = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
    assert metrics.sample_mse(a, b) == [1.0, 4.0 / 3.0]
    assert sum(metrics.sample_mse(a, b)) / 2 == pytest.approx(metrics.mse(a, b))
    assert metrics.sample_mse(a[:1], b[:1]) is None and metrics.sample_mse(a, b[:, :2]) is None


def test_psnr_known_values():
    a = torch.zeros(4, 1, 16, 16)
    assert metrics.psnr(a, a.clone()) == math.inf
    b = a + 0.1  # mse = 0.01
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(4 / 0.01))
    assert metrics.psnr(a, b, data_range=1.0) == pytest.approx(20.0)
    assert metrics.psnr(a, a + 1.0) == pytest.approx(10 * math.log10(4.0))  # mse = 1 -> 6.0206 dB


@pytest.fixture(scope="session")
def classifier_cache(tmp_path_factory):
    """Train the classifier from scratch into a temporary cache dir (also checks the cache mechanism)."""
    d = tmp_path_factory.mktemp("npu_cache_fx_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("NPU_CACHE_FX_CACHE_DIR", str(d))
    mp.setattr(digits, "_classifier", None)
    net = digits.get_classifier()
    yield d, net
    mp.undo()


def test_classifier_cached_and_deterministic(classifier_cache):
    d, net = classifier_cache
    path = d / "digits_classifier_v1.safetensors"
    assert path.exists()
    assert digits.get_classifier() is net  # in-memory cache
    from safetensors.torch import load_file

    sd = load_file(str(path))
    assert all(torch.equal(sd[k], v) for k, v in net.state_dict().items())


def test_classifier_holdout_accuracy(classifier_cache):
    assert digits.classifier_holdout_accuracy() >= 0.9
    assert digits.classifier_holdout_accuracy(shifted=True) >= 0.9
    x, y = load_digits_16()
    _, te = split_indices(len(x))
    assert metrics.class_fidelity(x[te], y[te]) >= 0.9
    assert metrics.class_fidelity(x[te, 0], y[te]) >= 0.9  # (B, H, W) accepted
    # wrong labels -> low fidelity
    assert metrics.class_fidelity(x[te], (y[te] + 1) % 10) < 0.1


def test_class_fidelity_video_majority_vote(classifier_cache):
    x, y = load_digits_16()
    _, te = split_indices(len(x))
    te = te[:100]
    clips = make_clips(x[te], torch.arange(len(te)) % 8)  # (B, 4, 1, 16, 16)
    assert metrics.class_fidelity(clips, y[te]) >= 0.9
    assert metrics.class_fidelity(clips.transpose(1, 2), y[te]) >= 0.9  # (B, 1, F, H, W) also accepted
    # majority vote: corrupt one frame of four with noise -> still right
    bad = clips.clone()
    bad[:, 0] = torch.rand_like(bad[:, 0]) * 2 - 1
    assert metrics.class_fidelity(bad, y[te]) >= 0.9
    # majority: 3 frames of digit A and 1 frame of B -> A
    a, b = x[te[0]], x[te[1]]
    clip = torch.stack([a, a, b, a]).unsqueeze(0)
    assert digits.predict(clip).item() == digits.predict(a.unsqueeze(0)).item()


def test_noise_has_chance_fidelity(classifier_cache):
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(200, 1, 16, 16, generator=g) * 2 - 1
    assert metrics.class_fidelity(noise, torch.arange(200) % 10) < 0.4
