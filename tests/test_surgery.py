"""Surgery equals masking, and the fast sweep equals the naive one, on every graph shape."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from factories import (
    ARCHITECTURES,
    functional_global_pool,
    randomize_batchnorm,
    residual_block,
    separate_activation,
    sequential_bn_flatten,
    textures,
)

from fineprune.errors import PruningError
from fineprune.prune.channels import trace_channels
from fineprune.prune.graph import ModelGraph, inline_nested_models
from fineprune.prune.surgery import cut
from fineprune.prune.sweep import ChannelSweeper, masked_predict, naive_sweep
from study.architectures import seed_cnn, small_resnet, small_vgg

CASES = [
    ("sequential_bn_flatten", None),  # conv2 -> BN -> pool -> dropout -> Flatten -> Dense
    ("sequential_bn_flatten", "conv1"),  # conv1 -> BN -> pool -> conv2
    ("functional_global_pool", "conv2"),  # pooled output -> conv3, GAP->Concat->Dense, Flatten
    ("functional_global_pool", None),  # conv3 -> GMP -> Concatenate with another branch
    ("residual_block", None),  # res_conv -> BN -> ReLU -> Add: zeroed, not removed
    ("residual_block", "stem"),  # stem feeds a conv and the Add's shortcut
    ("separate_activation", None),  # conv2 (linear) -> BN -> Activation -> pool -> Dense
]


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    return textures(96, seed=7)[0]


def _model(name: str) -> keras.Model:
    model = ARCHITECTURES[name](seed=3)
    randomize_batchnorm(model, seed=5)
    return model


def _near_tie(outputs: np.ndarray, rows: np.ndarray, tol: float = 1e-5) -> bool:
    top2 = np.sort(outputs[rows], axis=-1)[:, -2:]
    return bool(np.all(top2[:, 1] - top2[:, 0] < tol))


@pytest.mark.parametrize(("arch", "layer"), CASES)
def test_cut_model_equals_masked_model(arch: str, layer: str | None, inputs: np.ndarray, tmp_path):
    model = _model(arch)
    path = trace_channels(ModelGraph(model), layer)
    _, sweep = ChannelSweeper(path, batch_size=40).profile_and_sweep(inputs, np.arange(48))
    for k in sorted({1, path.channels // 2, path.channels - 1}):
        pruned = np.sort(sweep.order[:k])
        result = cut(model, path, pruned)
        masked = masked_predict(path, inputs, pruned)
        got = np.asarray(result.model.predict(inputs, verbose=0))
        np.testing.assert_allclose(got, masked, atol=1e-5, rtol=0)
        # The curve was computed on exactly what the cut model computes.
        differ = np.flatnonzero(got.argmax(-1) != sweep.predictions[k])
        assert len(differ) == 0 or _near_tie(got, differ)

        # A standard Keras model: saved, reloaded with no custom objects, same outputs.
        saved = tmp_path / f"{arch}_{k}.keras"
        result.model.save(saved)
        reloaded = keras.models.load_model(saved, compile=False, safe_mode=True)
        np.testing.assert_allclose(reloaded.predict(inputs, verbose=0), got, atol=1e-6)

        if path.removable:
            assert result.mode == "removed"
            assert result.model.get_layer(path.layer.name).kernel.shape[-1] == path.channels - k
            assert result.model.count_params() < model.count_params()
        else:
            assert result.mode == "zeroed"
            assert "Add" in result.reason
            assert result.model.count_params() == model.count_params()


@pytest.mark.parametrize(("arch", "layer"), CASES)
def test_fast_sweep_equals_naive_sweep(arch: str, layer: str | None, inputs: np.ndarray):
    model = _model(arch)
    path = trace_channels(ModelGraph(model), layer)
    _, fast = ChannelSweeper(path, batch_size=32).profile_and_sweep(inputs, np.arange(64))
    naive = naive_sweep(path, inputs, fast.order, batch_size=50)
    assert fast.predictions.shape == (path.channels + 1, len(inputs))
    for k in range(path.channels + 1):
        differ = np.flatnonzero(fast.predictions[k] != naive.predictions[k])
        if len(differ):
            outputs = masked_predict(path, inputs, fast.order[:k])
            assert _near_tie(outputs, differ), f"k={k}: {len(differ)} predictions differ"


def test_profile_is_mean_activation_after_the_activation(inputs: np.ndarray):
    model = _model("sequential_bn_flatten")
    path = trace_channels(ModelGraph(model), None)
    profile, _ = ChannelSweeper(path).profile_and_sweep(inputs, np.arange(len(inputs)))
    activations = keras.Model(model.inputs, model.get_layer("conv2").output).predict(
        inputs, verbose=0
    )
    np.testing.assert_allclose(
        profile.mean_over(np.arange(len(inputs))),
        activations.mean(axis=(0, 1, 2)),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_array_equal(
        profile.order, np.argsort(activations.mean(axis=(0, 1, 2)), kind="stable")
    )


def test_separate_activation_layer_is_profiled_not_the_linear_conv():
    path = trace_channels(ModelGraph(_model("separate_activation")), None)
    assert path.layer.name == "conv2"
    assert path.profile_layer == "act2"


def test_masking_is_at_the_mixer_not_at_the_conv_output(inputs: np.ndarray):
    """With BatchNorm between, zeroing the conv output is not pruning: BN(0) = beta - ..."""
    model = _model("sequential_bn_flatten")
    path = trace_channels(ModelGraph(model), None)
    pruned = np.array([0, 3, 5])
    removed = cut(model, path, pruned).model.predict(inputs, verbose=0)

    zero_at_conv = keras.models.clone_model(model)
    zero_at_conv.set_weights(model.get_weights())
    kernel, bias = zero_at_conv.get_layer("conv2").get_weights()
    kernel[..., pruned], bias[pruned] = 0.0, 0.0
    zero_at_conv.get_layer("conv2").set_weights([kernel, bias])
    naive = zero_at_conv.predict(inputs, verbose=0)
    assert np.abs(naive - removed).max() > 1e-3


def test_every_consumer_of_a_shared_output_is_adjusted():
    model = _model("functional_global_pool")
    path = trace_channels(ModelGraph(model), "conv2")
    assert {m.node.name for m in path.mixers} == {"conv3", "dense_gap", "dense_flat"}
    result = cut(model, path, np.array([1, 2, 7]))
    assert set(result.adjusted_layers) == {"bn2", "conv3", "dense_gap", "dense_flat"}
    assert result.model.get_layer("conv3").kernel.shape[-2] == 9
    assert result.model.get_layer("dense_flat").kernel.shape[0] == 8 * 8 * 9
    # dense_gap sees 9 pooled channels of conv2 and the 6 of conv3, concatenated
    assert result.model.get_layer("dense_gap").kernel.shape[0] == 9 + 6


def test_zeroed_channels_are_exactly_zero_at_the_add():
    model = _model("residual_block")
    path = trace_channels(ModelGraph(model), None)
    pruned = np.array([0, 2, 4])
    result = cut(model, path, pruned)
    relu = keras.Model(result.model.inputs, result.model.get_layer("res_relu").output)
    values = relu.predict(textures(16, 1)[0], verbose=0)
    assert np.all(values[..., pruned] == 0.0)
    assert np.any(values[..., 1] != 0.0)


def test_cannot_remove_every_channel():
    model = _model("sequential_bn_flatten")
    path = trace_channels(ModelGraph(model), None)
    with pytest.raises(PruningError, match="keep at least one"):
        cut(model, path, np.arange(path.channels))


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ("nope", "no layer named 'nope'"),
        ("bn1", "is a BatchNormalization"),
        ("out", "softmax output"),
    ],
)
def test_unprunable_layers_are_refused(layer: str, message: str):
    with pytest.raises(PruningError, match=message):
        trace_channels(ModelGraph(sequential_bn_flatten()), layer)


def test_model_without_convolution_needs_a_layer_name():
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, activation="relu"), keras.layers.Dense(2)]
    )
    with pytest.raises(PruningError, match="no Conv1D/Conv2D/Conv3D"):
        trace_channels(ModelGraph(model), None)


def test_dense_layer_can_be_pruned(tmp_path: Path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Dense(3, activation="softmax", name="out"),
        ]
    )
    randomize_batchnorm(model)
    x = np.random.default_rng(0).normal(size=(32, 6)).astype(np.float32)
    path = trace_channels(ModelGraph(model), "hidden")
    result = cut(model, path, np.array([2, 5]))
    np.testing.assert_allclose(
        result.model.predict(x, verbose=0), masked_predict(path, x, np.array([2, 5])), atol=1e-6
    )
    assert result.model.get_layer("hidden").units == 6


def test_architectures_cover_what_the_issue_lists():
    assert {f.__name__ for f in ARCHITECTURES.values()} == {
        sequential_bn_flatten.__name__,
        functional_global_pool.__name__,
        residual_block.__name__,
        separate_activation.__name__,
    }


def test_nested_backbone_is_inlined_and_pruned(inputs: np.ndarray, tmp_path: Path):
    keras.utils.set_random_seed(1)
    backbone = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(6, 3, activation="relu", name="inner_conv"),
            keras.layers.BatchNormalization(name="inner_bn"),
        ],
        name="backbone",
    )
    x_in = keras.Input((16, 16, 3))
    x = keras.layers.MaxPooling2D(name="pool")(backbone(x_in))
    out = keras.layers.Dense(4, name="head")(keras.layers.Flatten(name="flat")(x))
    model = keras.Model(x_in, out)
    randomize_batchnorm(backbone)

    flat, inlined = inline_nested_models(model)
    assert inlined == ["backbone"]
    np.testing.assert_allclose(flat.predict(inputs, verbose=0), model.predict(inputs, verbose=0))
    path = trace_channels(ModelGraph(flat), None)
    assert path.layer.name == "inner_conv"
    pruned = np.array([1, 4])
    result = cut(flat, path, pruned)
    np.testing.assert_allclose(
        result.model.predict(inputs, verbose=0), masked_predict(path, inputs, pruned), atol=1e-5
    )
    result.model.save(tmp_path / "flat.keras")
    assert keras.models.load_model(tmp_path / "flat.keras").get_layer("inner_conv").filters == 4


@pytest.mark.parametrize("build", [seed_cnn, small_resnet, small_vgg])
def test_every_reference_architecture_is_cut_exactly(build):
    """The victims of the experiments, at their real size: the cut predicts what masking does."""
    keras.utils.set_random_seed(0)
    model = build(classes=9)
    randomize_batchnorm(model)
    x = np.random.default_rng(0).random((8, 32, 32, 3)).astype(np.float32)
    path = trace_channels(ModelGraph(model), None)
    pruned = np.arange(0, path.channels, 3)
    result = cut(model, path, pruned)
    np.testing.assert_allclose(
        result.model.predict(x, verbose=0), masked_predict(path, x, pruned), atol=1e-5
    )
