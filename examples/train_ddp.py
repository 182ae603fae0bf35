"""Data-parallel training on a `.d3` file with DistributedDataParallel, one process per rank.

    d3codec encode digits --budget 1ipc -o digits.d3
    torchrun --nproc_per_node 2 examples/train_ddp.py digits.d3 --test digits --steps 300

`D3Dataset` is rank-aware: built after `init_process_group`, it reads the rank and world size
from `torch.distributed`, and every rank decodes its own disjoint share of the same seeded stream
(as `DistributedSampler` would split a real dataset), so there is no sampler to set up. CPU ranks
talk over gloo, GPU ranks (one GPU each) over NCCL.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import d3codec
from d3codec.data import normalize_uint8, open_dataset
from d3codec.models import ConvNet


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for soft labels (probabilities [B, classes]) or hard labels (class ids [B])."""
    if labels.dim() == 2:
        return -(labels * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    return F.cross_entropy(logits, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", help="the .d3 file to train on")
    parser.add_argument("--test", required=True, metavar="DATASET", help="dataset whose real test split is scored")
    parser.add_argument("--data-dir", help="folder holding a built-in dataset's files (not needed for digits)")
    parser.add_argument("--steps", type=int, default=300, help="SGD steps (default: 300)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address for every process.
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    f = d3codec.load(args.file)
    meta = f.metadata
    # The real test split: rank 0 decodes it into d3codec's cache once, then every rank opens it.
    if rank == 0:
        open_dataset(args.test, data_dir=args.data_dir, split="test")
    dist.barrier()
    test = open_dataset(args.test, data_dir=args.data_dir, split="test", progress=False)
    if (test.num_classes, tuple(test.image_shape)) != (meta.num_classes, tuple(meta.image_shape)):
        raise SystemExit(f"error: {args.test} has {test.num_classes} classes of {tuple(test.image_shape)} images, "
                         f"{args.file} {meta.num_classes} of {tuple(meta.image_shape)}; pass the file's dataset")
    # The SAME seed on every rank: the ranks split one stream instead of drawing unrelated ones.
    # epoch_size = one batch per rank, so each step is one global batch of 256 x world samples.
    batch_size = 256
    data = d3codec.D3Dataset(f, batch_size=batch_size, device=device, seed=args.seed,
                             epoch_size=batch_size * world, endless=True, augment=True)

    torch.manual_seed(args.seed)
    c, h, w = meta.image_shape
    net = ConvNet(c, meta.num_classes, (h, w)).to(device)
    # DDP broadcasts rank 0's weights at construction and averages gradients at every step.
    model = DistributedDataParallel(net, device_ids=[local_rank] if device.type == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[args.steps // 2], gamma=0.1)

    model.train()
    for step, (images, labels) in zip(range(1, args.steps + 1), data):
        if step == 1:  # show that the ranks drew different samples: one checksum per rank's batch
            sums = [torch.zeros(1, device=device) for _ in range(world)]
            dist.all_gather(sums, images.sum().reshape(1))
            if rank == 0:
                print(f"first-batch checksums per rank: {[round(s.item(), 3) for s in sums]} "
                      f"(all different: {len({s.item() for s in sums}) == world})", flush=True)
        loss = loss_fn(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if rank == 0 and (step % 50 == 0 or step == args.steps):
            print(f"step {step}/{args.steps}  loss {loss.item():.4f} (rank 0's batch)", flush=True)

    # Test on real images: every rank scores every world-th image, normalised with the FILE's
    # mean and std (the pixel space the network was trained in), and the counts are summed.
    net.eval()
    mine = list(range(rank, len(test), world))
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for s in range(0, len(mine), 1024):
            idx = mine[s:s + 1024]
            pred = net(normalize_uint8(test.uint8(idx), meta.mean, meta.std, device)).argmax(dim=1)
            correct += (pred == test.label_tensor(idx, device)).sum()
    dist.all_reduce(correct)
    if rank == 0:
        print(f"test accuracy: {100 * correct.item() / len(test):.2f}% on {len(test)} real {args.test} test "
              f"images ({f.labels.kind} labels, {args.steps} steps on {world} ranks)")
    # Every rank leaves the group together, so none tears it down while another is still inside
    # a collective (the all_reduce above).
    dist.barrier()
    dist.destroy_process_group()
    # Under gloo a worker thread frees a finished collective's tensors after the caller has moved on,
    # and that needs the GIL. Release it briefly so this happens now: at interpreter shutdown the
    # thread would abort the rank ("terminate called without an active exception").
    time.sleep(0.1)


if __name__ == "__main__":
    main()
