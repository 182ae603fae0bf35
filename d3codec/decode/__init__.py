"""Sampling: latents -> images. `D3Dataset` streams training batches from a `.d3` file; the pieces
below are shared with the encoder, the evaluator and the `sample` command.

- `D3Dataset(path_or_d3, batch_size=256, device="auto", seed=0, mode="mixed", ...)`
- `build_decoders(d3, device) -> list[nn.Module]`: the file's decoders, eval mode, weights loaded.
- `Renderer(d3, device)`: latents + classes -> decoder values, routed per class to its decoder.
- `PriorTensors.from_priors(priors, device)`, `sample_latents(priors, classes, comps, generator)`.
- `mean_images(d3, device, space="pixels") -> [N, K, C, H, W]`.
- `OutputSpace(metadata, denormalize)`, `LabelTable(labels, num_classes)`.
- `sample_grid(d3, n, classes, seed) -> PIL.Image` (the `d3codec sample` picture).
"""
from d3codec.decode.dataset import D3Dataset, Draw
from d3codec.decode.decoders import LabelTable, OutputSpace, Renderer, build_decoders, mean_images, writer_version
from d3codec.decode.grid import sample_grid
from d3codec.decode.sampling import PriorTensors, sample_latents

__all__ = ["D3Dataset", "Draw", "build_decoders", "Renderer", "PriorTensors", "sample_latents", "mean_images",
           "OutputSpace", "LabelTable", "sample_grid", "writer_version"]
