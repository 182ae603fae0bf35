"""The CPU training steps that `malloc_tuning.py` and `process_scaling.py` time, as child-process
code: `step()` after this runs one step of the 64 px small decoder's fit (task `decoder`, batch
256) or of ConvNet-D4 training (task `convnet`, batch `CONVNET_BATCH`) on random data."""

STEP = r"""
import torch
from d3codec.models.convnet import ConvNet
from d3codec.models.registry import build_decoder
torch.manual_seed(0)
if TASK == "decoder":
    net = build_decoder("small", 1, {"channels": 3, "image_size": 64, "latent_dim": 256, "width": 128, "norm": "batch"})
    x, y = torch.randn(256, 256), torch.randn(256, 3, 64, 64)
    loss = lambda: (net(x) - y).pow(2).mean()
    opt = torch.optim.Adam(net.parameters())
else:
    net = ConvNet(3, 100, 64)
    x, y = torch.randn(CONVNET_BATCH, 3, 64, 64), torch.randint(0, 100, (CONVNET_BATCH,))
    loss = lambda: torch.nn.functional.cross_entropy(net(x), y)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
def step():
    opt.zero_grad(); loss().backward(); opt.step()
"""
