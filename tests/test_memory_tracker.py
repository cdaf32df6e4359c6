"""TensorMemoryTracker (utils/tensor_memory.py) against hand-computed byte counts."""

import torch
from torch import nn

from medico_peft.utils.tensor_memory import TensorMemoryTracker

F32 = 4


def test_views_share_one_storage_and_frees_are_counted():
    tracker = TensorMemoryTracker()
    with tracker:
        a = torch.empty(1000)  # 4000 bytes
        b = a.view(10, 100)
        c = b.t()[2:5]  # views: no new bytes
        a.add_(1.0)  # in place: no new bytes
        assert tracker.total == 4000
        d = torch.empty(500)  # 2000
        assert tracker.total == 6000
        del a, b  # c still holds the storage
        assert tracker.total == 6000
        del c
        assert tracker.total == 2000
        e = torch.empty(2000)  # 8000 -> live 10000, the peak
        del d, e
        assert tracker.total == 0
    assert tracker.peak == 10000
    assert tracker.peak_by_category["activations"] == 10000


def _mlp_case(batch=16, d0=32, d1=64, d2=48, d3=8):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d0, d1), nn.ReLU(), nn.Linear(d1, d2), nn.ReLU(), nn.Linear(d2, d3))
    model[0].requires_grad_(False)  # frozen first layer
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.Adam(trainable, lr=1e-3)
    return model, trainable, optim, (batch, d0, d1, d2, d3)


def test_linear_stack_categories_match_hand_computed_bytes():
    model, trainable, optim, (b, d0, d1, d2, d3) = _mlp_case()
    x = torch.randn(b, d0)
    # Warm-up step so Adam's state exists before the measured step.
    model(x).pow(2).mean().backward()
    optim.step()
    optim.zero_grad(set_to_none=True)

    frozen = (d0 * d1 + d1) * F32
    train = (d1 * d2 + d2 + d2 * d3 + d3) * F32
    n_trainable_tensors = 4
    adam = 2 * train + n_trainable_tensors * F32  # exp_avg + exp_avg_sq, plus a 0-dim float32 step each

    tracker = TensorMemoryTracker()
    tracker.register_model(model)
    tracker.register_optimizer(optim)
    tracker.register(x, "activations")
    live = tracker.live()
    assert live["frozen_weights"] == frozen
    assert live["trainable_weights"] == train
    assert live["optimizer_state"] == adam
    assert live["gradients"] == 0
    with tracker:
        y = model(x)
        loss = y.pow(2).mean()
        # Alive after the forward, by hand: x; relu1's output r1 (saved by linear2; the frozen linear1
        # and relu1 record nothing); relu2's output r2 (saved by relu2 itself and by linear3: one
        # storage); y (saved by pow); the scalar loss. Temporaries (h1, h2, y²) are freed.
        after_forward = tracker.live()["activations"]
        assert after_forward == (b * d0 + b * d1 + b * d2 + b * d3 + 1) * F32
        loss.backward()
        assert tracker.live()["gradients"] == train
        del y, loss
    backward_peak, backward_cats = tracker.peak, dict(tracker.peak_by_category)
    assert (backward_cats["frozen_weights"], backward_cats["trainable_weights"],
            backward_cats["optimizer_state"]) == (frozen, train, adam)
    with tracker:
        optim.step()
        optim.zero_grad(set_to_none=True)
    assert tracker.live()["gradients"] == 0
    assert tracker.live()["optimizer_state"] == adam
    assert tracker.live()["activations"] == b * d0 * F32  # only x is left
    static = frozen + train + adam
    # The peak holds at least everything alive after the forward, and at most that plus all gradients
    # plus one batch-sized temporary per layer (the backward's activation gradients).
    assert backward_peak >= static + after_forward
    assert backward_peak <= static + after_forward + train + (b * d1 + b * d2 + 2 * b * d3) * F32
    assert tracker.peak == sum(tracker.peak_by_category.values())
    tracker.remove_hooks()


def test_cached_features_and_relabel():
    tracker = TensorMemoryTracker()
    feats = torch.zeros(10, 10)
    tracker.register([feats], "cached_features")
    assert tracker.live()["cached_features"] == 400
    tracker.register(feats[0], "activations")  # a view: same storage, re-labelled, not added
    assert tracker.total == 400 and tracker.live()["activations"] == 400
