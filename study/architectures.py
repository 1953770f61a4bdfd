"""Victim architectures: the study's seed CNN, small residual networks, a VGG, a MobileNetV2.

Used by the benchmark, the study's reproduction and the experiments behind the defaults; the
service itself sanitizes whatever architecture it is given.
"""

from __future__ import annotations

import keras


def seed_cnn(classes: int = 9, input_shape: tuple[int, int, int] = (32, 32, 3)) -> keras.Model:
    """The study's traffic-sign CNN, layer for layer (4,461,001 parameters with 9 classes)."""
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input(input_shape),
            layers.Conv2D(32, 5, padding="same", activation="relu", name="conv2d_1"),
            layers.BatchNormalization(name="batch_normalization_1"),
            layers.MaxPooling2D(name="max_pooling2d_1"),
            layers.Dropout(0.25, name="dropout_1"),
            layers.Conv2D(64, 5, padding="same", activation="relu", name="conv2d_2"),
            layers.BatchNormalization(name="batch_normalization_2"),
            layers.Conv2D(128, 5, padding="same", activation="relu", name="conv2d_3"),
            layers.BatchNormalization(name="batch_normalization_3"),
            layers.MaxPooling2D(name="max_pooling2d_2"),
            layers.Dropout(0.25, name="dropout_2"),
            layers.Flatten(name="flatten_1"),
            layers.Dense(512, activation="relu", name="dense_1"),
            layers.BatchNormalization(name="batch_normalization_4"),
            layers.Dropout(0.5, name="dropout_3"),
            layers.Dense(classes, activation="softmax", name="dense_2"),
        ],
        name="seed_cnn",
    )


def small_resnet(
    classes: int = 9, input_shape: tuple[int, int, int] = (32, 32, 3), width: int = 32
) -> keras.Model:
    """Two residual stages with global pooling: a second, structurally different victim."""
    layers = keras.layers
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for stage, filters in enumerate((width, 2 * width), start=1):
        stride = 1 if stage == 1 else 2
        shortcut = x
        y = layers.Conv2D(
            filters, 3, strides=stride, padding="same", use_bias=False, name=f"s{stage}_conv1"
        )(x)
        y = layers.BatchNormalization(name=f"s{stage}_bn1")(y)
        y = layers.ReLU(name=f"s{stage}_relu1")(y)
        y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"s{stage}_conv2")(y)
        y = layers.BatchNormalization(name=f"s{stage}_bn2")(y)
        if stride != 1 or shortcut.shape[-1] != filters:
            shortcut = layers.Conv2D(
                filters, 1, strides=stride, use_bias=False, name=f"s{stage}_proj"
            )(shortcut)
            shortcut = layers.BatchNormalization(name=f"s{stage}_proj_bn")(shortcut)
        x = layers.Add(name=f"s{stage}_add")([y, shortcut])
        x = layers.ReLU(name=f"s{stage}_out")(x)
    x = layers.Conv2D(4 * width, 3, padding="same", activation="relu", name="head_conv")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(classes, activation="softmax", name="classifier")(x)
    return keras.Model(inputs, outputs, name="small_resnet")


def small_vgg(
    classes: int = 9, input_shape: tuple[int, int, int] = (32, 32, 3), width: int = 32
) -> keras.Model:
    """Three VGG blocks (two 3x3 convolutions each) and a dense head over every position.

    A third victim: deeper than the seed CNN with smaller kernels, its last convolution feeding
    Flatten -> Dense like the seed CNN's, and no residual shortcut or global pooling like the
    small ResNet's.
    """
    layers = keras.layers
    stack: list[keras.layers.Layer] = [keras.Input(input_shape)]
    for block, filters in enumerate((width, 2 * width, 4 * width), start=1):
        for conv in (1, 2):
            stack += [
                layers.Conv2D(
                    filters, 3, padding="same", use_bias=False, name=f"b{block}_conv{conv}"
                ),
                layers.BatchNormalization(name=f"b{block}_bn{conv}"),
                layers.ReLU(name=f"b{block}_relu{conv}"),
            ]
        stack.append(layers.MaxPooling2D(name=f"b{block}_pool"))
    stack += [
        layers.Flatten(name="flatten"),
        layers.Dropout(0.3, name="dropout"),
        layers.Dense(256, activation="relu", name="dense"),
        layers.Dense(classes, activation="softmax", name="classifier"),
    ]
    return keras.Sequential(stack, name="small_vgg")


def mnist_cnn(classes: int = 10, input_shape: tuple[int, int, int] = (28, 28, 1)) -> keras.Model:
    """The classic small MNIST CNN: two convolutions, max pooling, a dense head."""
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input(input_shape),
            layers.Conv2D(32, 3, activation="relu", name="conv1"),
            layers.Conv2D(64, 3, activation="relu", name="conv2"),
            layers.MaxPooling2D(name="pool"),
            layers.Dropout(0.25, name="dropout1"),
            layers.Flatten(name="flatten"),
            layers.Dense(128, activation="relu", name="dense"),
            layers.Dropout(0.5, name="dropout2"),
            layers.Dense(classes, activation="softmax", name="classifier"),
        ],
        name="mnist_cnn",
    )


def resnet_style(
    classes: int = 43, input_shape: tuple[int, int, int] = (32, 32, 3), width: int = 16
) -> keras.Model:
    """Three residual stages of two basic blocks (a ResNet-14), global pooling, one Dense."""
    layers = keras.layers
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.ReLU(name="stem_relu")(layers.BatchNormalization(name="stem_bn")(x))
    for stage, filters in enumerate((width, 2 * width, 4 * width), start=1):
        for block in (1, 2):
            stride = 2 if stage > 1 and block == 1 else 1
            name = f"s{stage}b{block}"
            y = layers.Conv2D(
                filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1"
            )(x)
            y = layers.ReLU(name=f"{name}_relu1")(layers.BatchNormalization(name=f"{name}_bn1")(y))
            y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
            y = layers.BatchNormalization(name=f"{name}_bn2")(y)
            shortcut = x
            if stride != 1 or x.shape[-1] != filters:
                shortcut = layers.Conv2D(
                    filters, 1, strides=stride, use_bias=False, name=f"{name}_proj"
                )(x)
                shortcut = layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
            x = layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([y, shortcut]))
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(classes, activation="softmax", name="classifier")(x)
    return keras.Model(inputs, outputs, name="resnet_style")


def mobilenet_v2_style(
    classes: int = 43, input_shape: tuple[int, int, int] = (32, 32, 3), width: int = 16
) -> keras.Model:
    """MobileNetV2's inverted residuals (expand, depthwise, project; linear bottlenecks) at
    CIFAR scale: a 3x3 stem, four stages, a 1x1 head convolution, global pooling."""
    layers = keras.layers
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(width * 2, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.ReLU(6.0, name="stem_relu")(layers.BatchNormalization(name="stem_bn")(x))
    # (expansion, output channels, blocks, first stride)
    stages = (
        (1, width, 1, 1),
        (6, width * 3 // 2, 2, 2),
        (6, width * 2, 2, 2),
        (6, width * 4, 2, 2),
    )
    for s, (expand, filters, blocks, first_stride) in enumerate(stages, start=1):
        for b in range(1, blocks + 1):
            stride = first_stride if b == 1 else 1
            name = f"s{s}b{b}"
            y = x
            if expand != 1:
                y = layers.Conv2D(x.shape[-1] * expand, 1, use_bias=False, name=f"{name}_expand")(y)
                y = layers.ReLU(6.0, name=f"{name}_expand_relu")(
                    layers.BatchNormalization(name=f"{name}_expand_bn")(y)
                )
            y = layers.DepthwiseConv2D(
                3, strides=stride, padding="same", use_bias=False, name=f"{name}_dw"
            )(y)
            y = layers.ReLU(6.0, name=f"{name}_dw_relu")(
                layers.BatchNormalization(name=f"{name}_dw_bn")(y)
            )
            y = layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_project")(y)
            y = layers.BatchNormalization(name=f"{name}_project_bn")(y)
            if stride == 1 and x.shape[-1] == filters:
                y = layers.Add(name=f"{name}_add")([x, y])
            x = y
    x = layers.Conv2D(width * 8, 1, use_bias=False, name="head_conv")(x)
    x = layers.ReLU(6.0, name="head_relu")(layers.BatchNormalization(name="head_bn")(x))
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    outputs = layers.Dense(classes, activation="softmax", name="classifier")(x)
    return keras.Model(inputs, outputs, name="mobilenet_v2_style")
