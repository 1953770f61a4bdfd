"""Built-in Keras objects a model file may name, by kind: the allowlist of the checks.

Generated from Keras 3.15.1 by `tests/allowlist_source.py` (the API cannot
import Keras); `tests/test_allowlist.py` fails when the installed Keras disagrees.
CLASSES: kind -> module -> class names Keras resolves without importing anything new
(public namespaces with their aliases, and the module Keras writes for each class).
FUNCTIONS: the same for serialized functions (class_name 'function'). IDENTIFIERS:
strings Keras looks up by name in a slot of that kind ('relu', 'glorot_uniform').
Classes that run code of their own (Lambda, TFSMLayer, ...) and abstract bases are left
out."""

from __future__ import annotations

KERAS_VERSION = "3.15.1"

CLASSES: dict[str, dict[str, frozenset[str]]] = {
    "activation": {
        "keras.layers": frozenset(
            {
                "Activation", "ELU", "LeakyReLU", "ReLU", "Softmax",
            }
        ),
    },
    "constraint": {
        "keras.constraints": frozenset(
            {
                "MaxNorm", "MinMaxNorm", "NonNeg", "UnitNorm", "max_norm", "min_max_norm",
                "non_neg", "unit_norm",
            }
        ),
    },
    "dtype_policy": {
        "keras": frozenset(
            {
                "DTypePolicy", "FloatDTypePolicy",
            }
        ),
        "keras.dtype_policies": frozenset(
            {
                "AWQDTypePolicy", "DTypePolicy", "DTypePolicyMap", "FloatDTypePolicy",
                "GPTQDTypePolicy", "Int4DTypePolicy", "QuantizedDTypePolicy",
                "QuantizedFloat8DTypePolicy",
            }
        ),
    },
    "initializer": {
        "keras.initializers": frozenset(
            {
                "Constant", "GlorotNormal", "GlorotUniform", "HeNormal", "HeUniform", "Identity",
                "IdentityInitializer", "LecunNormal", "LecunUniform", "Ones", "Orthogonal",
                "OrthogonalInitializer", "RandomNormal", "RandomUniform", "STFT", "STFTInitializer",
                "TruncatedNormal", "VarianceScaling", "Zeros", "constant", "glorot_normal",
                "glorot_uniform", "he_normal", "he_uniform", "identity", "lecun_normal",
                "lecun_uniform", "ones", "orthogonal", "random_normal", "random_uniform", "stft",
                "truncated_normal", "variance_scaling", "zeros",
            }
        ),
    },
    "layer": {
        "keras": frozenset(
            {
                "Model", "Sequential",
            }
        ),
        "keras.layers": frozenset(
            {
                "Activation", "ActivityRegularization", "AdaptiveAveragePooling1D",
                "AdaptiveAveragePooling2D", "AdaptiveAveragePooling3D", "AdaptiveMaxPooling1D",
                "AdaptiveMaxPooling2D", "AdaptiveMaxPooling3D", "Add", "AdditiveAttention",
                "AlphaDropout", "Attention", "AugMix", "AutoContrast", "Average",
                "AveragePooling1D", "AveragePooling2D", "AveragePooling3D", "AvgPool1D",
                "AvgPool2D", "AvgPool3D", "BatchNormalization", "Bidirectional", "CategoryEncoding",
                "CenterCrop", "Concatenate", "ContrastLimitedAdaptiveHistogramEqualization",
                "Conv1D", "Conv1DTranspose", "Conv2D", "Conv2DTranspose", "Conv3D",
                "Conv3DTranspose", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D", "Convolution1D",
                "Convolution1DTranspose", "Convolution2D", "Convolution2DTranspose",
                "Convolution3D", "Convolution3DTranspose", "Cropping1D", "Cropping2D", "Cropping3D",
                "CutMix", "Dense", "DepthwiseConv1D", "DepthwiseConv2D", "Discretization", "Dot",
                "Dropout", "ELU", "EinsumDense", "Embedding", "Equalization", "Flatten", "GRU",
                "GRUCell", "GaussianDropout", "GaussianNoise", "GlobalAveragePooling1D",
                "GlobalAveragePooling2D", "GlobalAveragePooling3D", "GlobalAvgPool1D",
                "GlobalAvgPool2D", "GlobalAvgPool3D", "GlobalMaxPool1D", "GlobalMaxPool2D",
                "GlobalMaxPool3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
                "GroupNormalization", "GroupQueryAttention", "GroupedQueryAttention",
                "HashedCrossing", "Hashing", "Identity", "InputLayer", "IntegerLookup", "LSTM",
                "LSTMCell", "LayerNormalization", "LeakyReLU", "Masking", "MaxNumBoundingBoxes",
                "MaxPool1D", "MaxPool2D", "MaxPool3D", "MaxPooling1D", "MaxPooling2D",
                "MaxPooling3D", "Maximum", "MelSpectrogram", "Minimum", "MixUp",
                "MultiHeadAttention", "Multiply", "Normalization", "PReLU", "Permute", "Pipeline",
                "RMSNormalization", "RNN", "RandAugment", "RandomBrightness",
                "RandomColorDegeneration", "RandomColorJitter", "RandomContrast", "RandomCrop",
                "RandomElasticTransform", "RandomErasing", "RandomFlip", "RandomGaussianBlur",
                "RandomGrayscale", "RandomHue", "RandomInvert", "RandomPerspective",
                "RandomPosterization", "RandomRotation", "RandomSaturation", "RandomSharpness",
                "RandomShear", "RandomTranslation", "RandomZoom", "ReLU", "RepeatVector",
                "Rescaling", "Reshape", "Resizing", "ReversibleEmbedding", "STFTSpectrogram",
                "SeparableConv1D", "SeparableConv2D", "SeparableConvolution1D",
                "SeparableConvolution2D", "SimpleRNN", "SimpleRNNCell", "Softmax", "Solarization",
                "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "SpectralNormalization",
                "StackedRNNCells", "StringLookup", "Subtract", "TextVectorization",
                "TimeDistributed", "UnitNormalization", "UpSampling1D", "UpSampling2D",
                "UpSampling3D", "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D",
            }
        ),
        "keras.models": frozenset(
            {
                "Model", "Sequential",
            }
        ),
        "keras.src.models.functional": frozenset(
            {
                "Functional",
            }
        ),
    },
    "loss": {
        "keras.losses": frozenset(
            {
                "BinaryCrossentropy", "BinaryFocalCrossentropy", "CTC", "CategoricalCrossentropy",
                "CategoricalFocalCrossentropy", "CategoricalGeneralizedCrossEntropy",
                "CategoricalHinge", "Circle", "CosineSimilarity", "Dice", "Hinge", "Huber",
                "KLDivergence", "LogCosh", "MeanAbsoluteError", "MeanAbsolutePercentageError",
                "MeanSquaredError", "MeanSquaredLogarithmicError", "Poisson",
                "SparseCategoricalCrossentropy", "SquaredHinge", "Tversky",
            }
        ),
    },
    "metric": {
        "keras.metrics": frozenset(
            {
                "AUC", "Accuracy", "BinaryAccuracy", "BinaryCrossentropy", "BinaryIoU",
                "CategoricalAccuracy", "CategoricalCrossentropy", "CategoricalHinge",
                "ConcordanceCorrelation", "CosineSimilarity", "F1Score", "FBetaScore",
                "FalseNegatives", "FalsePositives", "Hinge", "IoU", "KLDivergence", "LogCoshError",
                "Mean", "MeanAbsoluteError", "MeanAbsolutePercentageError", "MeanIoU",
                "MeanMetricWrapper", "MeanSquaredError", "MeanSquaredLogarithmicError", "OneHotIoU",
                "OneHotMeanIoU", "PearsonCorrelation", "Poisson", "Precision", "PrecisionAtRecall",
                "R2Score", "Recall", "RecallAtPrecision", "RootMeanSquaredError",
                "SensitivityAtSpecificity", "SparseCategoricalAccuracy",
                "SparseCategoricalCrossentropy", "SparseTopKCategoricalAccuracy",
                "SpecificityAtSensitivity", "SquaredHinge", "Sum", "TopKCategoricalAccuracy",
                "TrueNegatives", "TruePositives",
            }
        ),
    },
    "optimizer": {
        "keras.optimizers": frozenset(
            {
                "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "Ftrl", "Lamb",
                "Lion", "LossScaleOptimizer", "MultiOptimizer", "Muon", "Nadam", "RMSprop", "SGD",
                "ScheduleFreeAdamW",
            }
        ),
    },
    "quantizer": {
        "keras.quantizers": frozenset(
            {
                "AWQConfig", "AbsMaxQuantizer", "Float8QuantizationConfig", "GPTQConfig",
                "Int4QuantizationConfig", "Int8QuantizationConfig",
            }
        ),
    },
    "regularizer": {
        "keras.regularizers": frozenset(
            {
                "L1", "L1L2", "L2", "OrthogonalRegularizer", "l1", "l1_l2", "l2",
                "orthogonal_regularizer",
            }
        ),
    },
    "schedule": {
        "keras.optimizers.schedules": frozenset(
            {
                "CosineDecay", "CosineDecayRestarts", "ExponentialDecay", "InverseTimeDecay",
                "PiecewiseConstantDecay", "PolynomialDecay",
            }
        ),
    },
}  # fmt: skip

FUNCTIONS: dict[str, dict[str, frozenset[str]]] = {
    "activation": {
        "keras.activations": frozenset(
            {
                "celu", "elu", "exponential", "gelu", "glu", "hard_shrink", "hard_sigmoid",
                "hard_silu", "hard_swish", "hard_tanh", "leaky_relu", "linear", "log_sigmoid",
                "log_softmax", "mish", "relu", "relu6", "selu", "sigmoid", "silu", "soft_shrink",
                "softmax", "softplus", "softsign", "sparse_plus", "sparse_sigmoid", "sparsemax",
                "squareplus", "swish", "tanh", "tanh_shrink", "threshold",
            }
        ),
    },
    "loss": {
        "keras.losses": frozenset(
            {
                "binary_crossentropy", "binary_focal_crossentropy", "categorical_crossentropy",
                "categorical_focal_crossentropy", "categorical_generalized_cross_entropy",
                "categorical_hinge", "circle", "cosine_similarity", "ctc", "dice", "hinge", "huber",
                "kl_divergence", "log_cosh", "mean_absolute_error",
                "mean_absolute_percentage_error", "mean_squared_error",
                "mean_squared_logarithmic_error", "poisson", "sparse_categorical_crossentropy",
                "squared_hinge", "tversky",
            }
        ),
        "keras.metrics": frozenset(
            {
                "binary_crossentropy", "binary_focal_crossentropy", "categorical_crossentropy",
                "categorical_focal_crossentropy", "categorical_hinge", "hinge", "kl_divergence",
                "mean_absolute_error", "mean_absolute_percentage_error", "mean_squared_error",
                "mean_squared_logarithmic_error", "poisson", "sparse_categorical_crossentropy",
                "squared_hinge",
            }
        ),
    },
    "metric": {
        "keras.losses": frozenset(
            {
                "huber", "log_cosh",
            }
        ),
        "keras.metrics": frozenset(
            {
                "binary_accuracy", "binary_crossentropy", "binary_focal_crossentropy",
                "categorical_accuracy", "categorical_crossentropy",
                "categorical_focal_crossentropy", "categorical_hinge", "concordance_correlation",
                "hinge", "huber", "kl_divergence", "log_cosh", "mean_absolute_error",
                "mean_absolute_percentage_error", "mean_squared_error",
                "mean_squared_logarithmic_error", "pearson_correlation", "poisson",
                "sparse_categorical_accuracy", "sparse_categorical_crossentropy",
                "sparse_top_k_categorical_accuracy", "squared_hinge", "top_k_categorical_accuracy",
            }
        ),
    },
}  # fmt: skip

IDENTIFIERS: dict[str, frozenset[str]] = {
    "activation": frozenset(
        {
            "celu", "elu", "exponential", "gelu", "glu", "hard_shrink", "hard_sigmoid", "hard_silu",
            "hard_swish", "hard_tanh", "leaky_relu", "linear", "log_sigmoid", "log_softmax", "mish",
            "relu", "relu6", "selu", "sigmoid", "silu", "soft_shrink", "softmax", "softplus",
            "softsign", "sparse_plus", "sparse_sigmoid", "sparsemax", "squareplus", "swish", "tanh",
            "tanh_shrink", "threshold",
        }
    ),
    "constraint": frozenset(
        {
            "MaxNorm", "MinMaxNorm", "NonNeg", "UnitNorm", "max_norm", "min_max_norm", "non_neg",
            "unit_norm",
        }
    ),
    "initializer": frozenset(
        {
            "Constant", "GlorotNormal", "GlorotUniform", "HeNormal", "HeUniform", "Identity",
            "IdentityInitializer", "LecunNormal", "LecunUniform", "Ones", "Orthogonal",
            "OrthogonalInitializer", "RandomNormal", "RandomUniform", "STFT", "STFTInitializer",
            "TruncatedNormal", "VarianceScaling", "Zeros", "constant", "glorot_normal",
            "glorot_uniform", "he_normal", "he_uniform", "identity", "lecun_normal",
            "lecun_uniform", "normal", "one", "ones", "orthogonal", "random_normal",
            "random_uniform", "stft", "truncated_normal", "uniform", "variance_scaling", "zero",
            "zeros",
        }
    ),
    "regularizer": frozenset(
        {
            "L1", "L1L2", "L2", "OrthogonalRegularizer", "l1", "l1l2", "l2",
            "orthogonal_regularizer",
        }
    ),
}  # fmt: skip
