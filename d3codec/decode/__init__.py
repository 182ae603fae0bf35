"""Sampling: latents -> images. `D3Dataset` streams training batches from a `.d3` file; the pieces
below are shared with the encoder, the evaluator and the `sample` command.

- `D3Dataset(path_or_d3, batch_size=256, device="auto", seed=0, mode="mixed", ...)`, with its speed
  options in `DecodeOptions(precision, channels_last, compile, fold_bn, stem_matmul)`.
- `build_decoders(d3, device) -> list[nn.Module]`: the file's decoders, eval mode, weights loaded.
- `Renderer(d3, device)`: latents + classes -> decoder values, routed per class to its decoder.
- `sample_latents(priors, classes, comps, generator)`: latents of given classes and components.
- `mean_images(d3, device, space="pixels") -> [N, K, C, H, W]`.
- `sample_grid(d3, n, classes, seed) -> PIL.Image` (the `d3codec sample` picture).

Internals live in their modules: the sample order (`stream.Stream`, `stream.Draw`), priors on a
device (`sampling.PriorTensors`), pixel spaces and labels (`decoders.OutputSpace`,
`decoders.LabelTable`), `decoders.writer_version`.
"""
from d3codec.decode.dataset import D3Dataset
from d3codec.decode.decoders import DecodeOptions, Renderer, build_decoders, mean_images
from d3codec.decode.grid import sample_grid
from d3codec.decode.sampling import sample_latents

__all__ = ["D3Dataset", "DecodeOptions", "build_decoders", "Renderer", "sample_latents", "mean_images",
           "sample_grid"]
