"""Train a fresh classifier on nothing but a `.d3` file, then score it on real held-out images.

    d3codec encode digits --budget 1ipc -o digits.d3
    python examples/train.py digits.d3 --test digits --steps 300

`D3Dataset` decodes a new batch of training images from the file at every step (on the GPU when
there is one); the test images are real ones from the dataset's test split, normalised the way the
file says its images are, so the network sees one pixel space in training and in testing.
"""
import argparse

import torch
import torch.nn.functional as F

import d3codec
from d3codec.data import normalize_uint8, open_dataset
from d3codec.models import ConvNet


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for either label kind a file can hold: soft labels are probabilities
    [B, classes] (the teacher's, as in the paper), hard labels are class ids [B]."""
    if labels.dim() == 2:
        return -(labels * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, test, mean, std, device: str, batch_size: int = 1024) -> float:
    """Top-1 accuracy on every image of `test` (a `d3codec.data` split), normalised with `mean`/`std`."""
    model.eval()
    correct = 0
    for start in range(0, len(test), batch_size):
        idx = list(range(start, min(start + batch_size, len(test))))
        images = normalize_uint8(test.uint8(idx), mean, std, device)  # uint8 HWC -> normalised NCHW
        correct += int((model(images).argmax(dim=1) == test.label_tensor(idx, device)).sum())
    return correct / len(test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", help="the .d3 file to train on")
    parser.add_argument("--test", required=True, metavar="DATASET",
                        help="dataset whose real test split is scored (e.g. digits, mnist, a folder)")
    parser.add_argument("--data-dir", help="folder holding a built-in dataset's files (not needed for digits)")
    parser.add_argument("--steps", type=int, default=300, help="SGD steps (default: 300)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)  # the network's initial weights
    f = d3codec.load(args.file)  # validates every byte; raises d3codec.D3FormatError on a bad file
    meta = f.metadata
    test = open_dataset(args.test, data_dir=args.data_dir, split="test")
    if (test.num_classes, tuple(test.image_shape)) != (meta.num_classes, tuple(meta.image_shape)):
        parser.error(f"{args.file} holds {meta.num_classes} classes of {tuple(meta.image_shape)} images but "
                     f"{args.test} has {test.num_classes} of {tuple(test.image_shape)}; pass the file's dataset")

    # An endless stream of batches. epoch_size=batch_size makes every epoch one full batch; the
    # stream still walks through every component of every class in turn. augment=True applies
    # the differentiable Siamese augmentation (DSA) of the dataset-distillation literature.
    batch_size = 256
    data = d3codec.D3Dataset(f, batch_size=batch_size, device=args.device, seed=args.seed,
                             epoch_size=batch_size, endless=True, augment=True)

    c, h, w = meta.image_shape
    model = ConvNet(c, meta.num_classes, (h, w)).to(args.device)  # the literature's ConvNet, depth from size
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[args.steps // 2], gamma=0.1)

    model.train()
    for step, (images, labels) in zip(range(1, args.steps + 1), data):
        loss = loss_fn(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step}/{args.steps}  loss {loss.item():.4f}", flush=True)

    # Real test images, normalised with the FILE's mean and std (the pixel space it was trained in).
    acc = test_accuracy(model, test, meta.mean, meta.std, args.device)
    print(f"test accuracy: {100 * acc:.2f}% on {len(test)} real {args.test} test images "
          f"({f.labels.kind} labels, {args.steps} steps)")


if __name__ == "__main__":
    main()
