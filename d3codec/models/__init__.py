"""Networks: decoder families (`small`, `medium`, `large`, built by name from header hparams via
`build_decoder`) and the classifiers (`convnet`, `resnet`) used for experts and evaluation.

`ConvNet(in_channels, num_classes, image_size)` is the dataset-distillation literature's classifier
that `d3codec eval` trains and the examples use: build it from a file's `metadata.image_shape` and
`metadata.num_classes` to train on `D3Dataset` batches (its depth follows the image size). Its
flat-parameter helpers for trajectory matching stay in `d3codec.models.convnet`.
"""
from d3codec.models.convnet import ConvNet
from d3codec.models.registry import (
    DecoderError,
    DecoderHparamsError,
    UnknownDecoderError,
    build_decoder,
    decoder_specs,
    export_state,
    fold_batchnorm,
    is_registered,
    num_parameters,
    register_decoder,
)

__all__ = [
    "build_decoder", "register_decoder", "decoder_specs", "is_registered", "num_parameters", "export_state",
    "fold_batchnorm", "DecoderError", "UnknownDecoderError", "DecoderHparamsError", "ConvNet",
]
