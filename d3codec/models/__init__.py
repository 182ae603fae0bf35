"""Networks: decoder families (`small`, `medium`, `large`, built by name from header hparams via
`build_decoder`) and the classifiers (`convnet`, `resnet`) used for experts and evaluation."""
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
    "fold_batchnorm", "DecoderError", "UnknownDecoderError", "DecoderHparamsError",
]
