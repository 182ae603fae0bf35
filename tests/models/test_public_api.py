"""The public model surface: `d3codec.models.ConvNet` builds the classifier users train on a file,
and exporting it keeps `import d3codec` light (no torch until a submodule needs it)."""
from __future__ import annotations

import subprocess
import sys

import torch


def test_import_d3codec_loads_neither_torch_nor_the_models() -> None:
    code = "import sys, d3codec; print('torch' in sys.modules, 'd3codec.models' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_top_level_all_names_every_lazy_export() -> None:
    import d3codec

    assert set(d3codec.__all__) == {"__version__", "D3Error", *d3codec._LAZY}
    assert all(getattr(d3codec, name) is not None for name in d3codec.__all__)


def test_convnet_is_exported_and_builds_from_a_files_shape() -> None:
    import d3codec.models
    from d3codec.models import ConvNet
    from d3codec.models.convnet import ConvNet as Defined

    assert ConvNet is Defined and "ConvNet" in d3codec.models.__all__
    c, h, w = 1, 8, 8  # a digits file's metadata.image_shape
    net = ConvNet(c, 10, (h, w))
    assert net.depth == 1 and net(torch.zeros(2, c, h, w)).shape == (2, 10)
