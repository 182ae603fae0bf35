"""The D3 distillation loop: K Gaussian latents per class and a decoder, trained jointly.

Objective per iteration (`objective`): `mmd` (RBF-mixture MMD between expert features of decoded
samples and of real images of the same class, Siamese DSA), `mtt` (trajectory matching from a
random expert epoch, unrolled in constant activation memory, learnable step size), or
`mtt+mmd` (both, as the paper). Decoded values v in [-1, 1] become pixels p = (v + 1) / 2 and
then (p - mean) / std, the space real images live in, before any network sees them.

Before the objective, `fit_steps` iterations (`init="real"`) fit the decoder and the latent means to
reconstruct K real images per class, with Gaussian noise of std `fit_noise` on the latents (so
draws around a mean decode to plausible neighbours): the generative analogue of the real-image
initialisation of MTT and DM, which makes the objective start from a decoder that already draws
the data. The means start at their images' principal-component codes (GLO's initialisation).
On CPU the objective then fine-tunes the decoder gently (`lr_decoder` 1e-4): at 2e-3, 20 MMD steps
raised the contrast until half of the 10ipc CIFAR-10 pixels saturated (RESULTS.md).

The decoder's BatchNorm uses batch statistics while it trains; for the final phase (`final_fraction`
of the iterations) its statistics are calibrated over a large draw of the priors and folded into the
convolutions (the `norm="none"` decoder the file stores), and its weights and the latent means are
fake-quantised to their storage form (quantisation-aware training), so what the last iterations
optimise is exactly what the file stores and decoding never depends on batch-mates. Every random
draw comes from one `torch.Generator`, checkpointed with the state; the losses themselves are the
functions of `objectives.py`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call

from d3codec.augment import DSA, DSAParams
from d3codec.distill.checkpoint import optimizer_from_flat, optimizer_to_flat
from d3codec.distill.objectives import FeatureView, feature_mmd, feature_params, trajectory_loss
from d3codec.distill.pca import basis_rows, principal_axes
from d3codec.distill.planner import Plan, store_means, tensor_dtype
from d3codec.errors import ConfigError
from d3codec.format.types import Metadata, Stored
from d3codec.models.convnet import init_params
from d3codec.models.registry import build_decoder, fold_batchnorm

OBJECTIVES = ("mmd", "mtt", "mtt+mmd")
#: Std of every dimension of the fit's starting latents (PCA codes): 3x the default fit noise, about
#: where randomly started codes ended after a full fit (0.28-0.51 measured), so draws around a
#: mean stay neighbours of its image, not copies of it (unit variance cost digits 3 points).
PCA_CODE_STD = 0.3
#: The default fit shows each target image about this many times (in batches of `fit_batch`), in
#: `fit_steps` (the floor) to `MAX_FIT_STEPS` iterations: 1000 steps of 256 give MNIST and
#: CIFAR-10 1ipc 220-500 passes but the 5,000 targets of CIFAR-10 10ipc only 51, and 2000 steps
#: there scored 43.22% against 42.46% (RESULTS.md).
FIT_PASSES = 100
MAX_FIT_STEPS = 4000
#: At one image per class (float32 bytes) and up to this many pixels the fit takes at most
#: `MAX_FIT_STEPS`; the cap grows with the images per class the budget holds and shrinks with larger
#: images, so a fit costs about the same pixel-views per budgeted image anywhere (64x64 1ipc: 1000).
FIT_PIXELS = 32 * 32
#: The default plan keeps K low enough that the capped fit still shows every target this many times:
#: at 64x64 1ipc that is 128 components per class for 100 classes and 12 for 1,000 (the paper's
#: 1-10); at 32x32 and below it has not bound on any budget measured.
MIN_FIT_PASSES = 20
INITS = ("real", "random")


@dataclass
class DistillConfig:
    """Settings of the distillation loop (paper defaults on GPU; `cpu_defaults` for minutes on CPU)."""

    objective: str = "mtt+mmd"
    iterations: int = 10000
    seed: int = 0
    samples_per_class: int = 32      # decoded samples per class per MMD update
    real_per_class: int = 30         # real images per class per MMD update
    syn_steps: int = 10
    expert_epochs: int = 2
    max_start_epoch: int = 27
    unroll_batch: int = 200          # decoded images per unroll step
    unroll: str = "exact"
    lr_latents: float = 3e-4
    lr_decoder: float = 3e-4
    lr_lr: float = 1e-6
    init_lr: float = 1e-2
    mmd_weight: float = 1.0
    mmd_chunk: int = 16              # most classes per MMD forward/backward (bounds memory; fewer for large images)
    mmd_classes: int = 0             # classes drawn per MMD update (0: all); bounds its cost at many classes
    augment: bool = True
    final_fraction: float = 0.1      # last share of iterations: frozen BN statistics + fake quantisation
    calibration_samples: int = 4096
    init: str = "real"               # "real": reconstruct K real images per class first; "random": no fit
    fit_steps: int = 1000            # reconstruction iterations before the objective (init="real")
    fit_lr: float = 3e-3             # Adam, cosine-decayed over the fit (latent means at 3x)
    fit_noise: float = 0.1           # std of the latent noise while fitting; the priors' initial std
    fit_batch: int = 256             # targets per fit iteration
    learn_logvar: bool = True        # False: every log-variance stays at its initial value (they then
                                     # compress away and the planner spends the bytes on components)

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}")
        if self.iterations < 0:
            raise ConfigError(f"--iterations must be at least 0, got {self.iterations}")
        if self.iterations + (self.fit_steps if self.init == "real" else 0) < 1:
            raise ConfigError("nothing to train: --iterations and --fit-steps are both 0; give either at least 1")
        if self.mmd_classes < 0:
            raise ConfigError(f"mmd_classes must be at least 0 (0: all classes), got {self.mmd_classes}")
        if self.samples_per_class < 2 or self.real_per_class < 2:
            raise ConfigError("MMD needs at least 2 decoded and 2 real samples per class")
        if not 0.0 <= self.final_fraction <= 1.0:
            raise ConfigError(f"final_fraction must be in [0, 1], got {self.final_fraction}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}, not {self.init!r}")
        if self.fit_steps < 0 or self.fit_batch < 1 or not self.fit_noise > 0:
            raise ConfigError("fit_steps must be >= 0, fit_batch >= 1 and fit_noise > 0")

    @property
    def fit_iterations(self) -> int:
        """Iterations of the reconstruction phase (0 without `init="real"`)."""
        return self.fit_steps if self.init == "real" else 0

    @property
    def total_iterations(self) -> int:
        """Every iteration the loop runs: the fit, then the objective's `iterations`."""
        return self.fit_iterations + self.iterations

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def images_per_class(budget_bytes: int, num_classes: int, image_shape: Sequence[int]) -> float:
    """What a budget holds in float32 images per class (the field's IPC): 1.0 for `1ipc`."""
    return budget_bytes / (max(1, num_classes) * 4 * math.prod(int(x) for x in image_shape))


def max_fit_steps(image_shape: Sequence[int], ipc: float = 1.0) -> int:
    """The default fit's most iterations for images of `image_shape` (C, H, W) at `ipc` images per
    class: `MAX_FIT_STEPS` x max(1, ipc) x `FIT_PIXELS` / pixels, at most `MAX_FIT_STEPS` x max(1, ipc)."""
    pixels = int(image_shape[-1]) * int(image_shape[-2])
    scale = max(1.0, ipc) * min(1.0, FIT_PIXELS / max(1, pixels))
    return max(1, int(MAX_FIT_STEPS * scale))


def default_fit_steps(targets: int, config: DistillConfig, image_shape: Sequence[int] = (1, 32, 32),
                      ipc: float = 1.0) -> int:
    """Fit iterations for `targets` real images (N x K): `FIT_PASSES` views of each, at least
    `config.fit_steps`, at most `max_fit_steps` (or `config.fit_steps` if higher)."""
    wanted = math.ceil(FIT_PASSES * targets / max(1, config.fit_batch))
    return int(max(config.fit_steps, min(max_fit_steps(image_shape, ipc), wanted)))


def fit_latent_cap(num_classes: int, image_shape: Sequence[int], config: DistillConfig, ipc: float = 1.0) -> int:
    """Most components per class the default plan takes so that the capped fit shows each of the
    N x K targets `MIN_FIT_PASSES` times: more would each be seen too few times to be learnt."""
    views = max(max_fit_steps(image_shape, ipc), config.fit_steps) * config.fit_batch
    return max(1, views // (max(1, num_classes) * MIN_FIT_PASSES))


def budget_latent_cap(budget_bytes: int, num_classes: int, image_shape: Sequence[int], config: DistillConfig) -> int:
    """`fit_latent_cap` at the images per class `budget_bytes` holds: the plan's cap on K from the fit."""
    ipc = images_per_class(budget_bytes, num_classes, image_shape)
    return fit_latent_cap(num_classes, image_shape, config, ipc)


#: Image values one MMD chunk may hold (decoded and real images of its classes): 16 classes of
#: 62 images at 32x32 RGB, so the larger images of 64 px go in smaller chunks of classes.
MMD_CHUNK_VALUES = 16 * 62 * 3 * 32 * 32


def mmd_chunk_classes(config: DistillConfig, image_shape: Sequence[int]) -> int:
    """Classes per MMD forward/backward: `config.mmd_chunk`, fewer where their images would hold
    more than `MMD_CHUNK_VALUES` values (what bounds the objective's memory)."""
    per_class = (config.samples_per_class + config.real_per_class) * math.prod(image_shape)
    return max(1, min(config.mmd_chunk, MMD_CHUNK_VALUES // per_class))


def mmd_class_count(config: DistillConfig, num_classes: int) -> int:
    """Classes one MMD update runs on: all, or `config.mmd_classes` of them where that is fewer."""
    return num_classes if config.mmd_classes <= 0 else min(num_classes, config.mmd_classes)


def cpu_defaults(objective: str = "mmd") -> DistillConfig:
    """Settings that finish in minutes on a 2-core CPU (the `mmd` objective is the cheap one)."""
    return DistillConfig(objective=objective, iterations=100, samples_per_class=24, real_per_class=24, learn_logvar=False,
                         mmd_classes=10,
                         syn_steps=10, unroll_batch=50, lr_latents=3e-3, lr_decoder=1e-4, lr_lr=1e-6,
                         init_lr=1e-2, final_fraction=0.15, calibration_samples=2048)


class Distiller:
    """Trainable state (latents, decoder, step size), one `step()` per iteration, export to tensors.

    `real` is the `ImageDataset` of the classes distilled (labels 0..n-1); `experts` an
    `distill.experts.ExpertSet` trained on the same classes (`build_model`, `flat_at(i, epoch)`).
    """

    def __init__(self, plan: Plan, metadata: Metadata, real: Any, experts: Any, config: DistillConfig,
                 device: str | torch.device = "cpu") -> None:
        config.validate()
        self.plan, self.metadata, self.real, self.experts, self.config = plan, metadata, real, experts, config
        self.device = torch.device(device)
        self.augment = DSA() if config.augment else None
        self.num_classes = len(real.classes)
        self.generator = torch.Generator().manual_seed(config.seed)
        n, k, d = self.num_classes, plan.latents_per_class, plan.latent_dim
        self.decoder = build_decoder(plan.family, plan.version, plan.train_hparams or plan.hparams)
        _init_module(self.decoder, self.generator)
        self.decoder.to(self.device)
        self.mean = nn.Parameter(torch.randn(n, k, d, generator=self.generator).to(self.device))
        self.logvar = nn.Parameter(torch.zeros(n, k, d, device=self.device), requires_grad=config.learn_logvar)
        self.syn_lr = nn.Parameter(torch.tensor(config.init_lr, device=self.device))
        self.opt_latents = torch.optim.SGD([self.mean, self.logvar], lr=config.lr_latents, momentum=0.5)
        self.opt_decoder = torch.optim.Adam(self.decoder.parameters(), lr=config.lr_decoder, weight_decay=1e-5)
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=config.lr_lr, momentum=0.5)
        self.opt_fit = torch.optim.Adam([{"params": list(self.decoder.parameters())},
                                         {"params": [self.mean]}], lr=config.fit_lr)
        self.fit_targets: Optional[torch.Tensor] = None  # [N, K] train-split indices, drawn at the first fit step
        self.iteration = 0
        self.frozen = False
        self.last: dict[str, float] = {}
        pix_mean = torch.tensor(metadata.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        pix_std = torch.tensor(metadata.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._pix = (pix_mean, pix_std)
        self._real_index = [torch.from_numpy(real.indices_of_class(c)) for c in range(n)]
        self.net = experts.build_model().to(self.device)
        self._features = FeatureView(self.net)
        self._flat_cache: dict[tuple[int, int], torch.Tensor] = {}

    # ---------------------------------------------------------------- decoding
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, D] -> normalised images [B, C, H, W], in the real images' space."""
        if self.frozen and self.plan.weight_dtype == "I8":
            params = {name: _fake_quant(p, self.plan.weight_dtype) for name, p in self.decoder.named_parameters()}
            v = functional_call(self.decoder, {**params, **dict(self.decoder.named_buffers())}, (z,))
        else:
            v = self.decoder(z)
        lo, hi = self.metadata.value_range
        pixels = (v - lo) / (hi - lo)
        return (pixels - self._pix[0]) / self._pix[1]

    def _means(self) -> torch.Tensor:
        """The latent means [N, K, D]; in the final phase as the file stores them (`store_means`:
        grid or dtype rounding, straight-through gradient), as the decoder's weights are."""
        if not self.frozen:
            return self.mean
        stored = store_means(self.mean.detach().cpu(), self.logvar.detach().cpu(), self.plan.latent_dtype)
        return self.mean + (stored.dequantize().to(self.device) - self.mean).detach()

    def sample_latents(self, per_class: int, classes: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`per_class` draws per class (all, or `classes`), spread evenly over its K components:
        (z [B, D], labels [B])."""
        _, k, d = self.mean.shape
        cls = torch.arange(self.mean.shape[0]) if classes is None else torch.as_tensor(list(classes))
        n = len(cls)
        comp = torch.arange(per_class) % k
        eps = torch.randn(n, per_class, d, generator=self.generator).to(self.device)
        mu = self._means()[cls.to(self.device)][:, comp]
        sd = torch.exp(0.5 * self.logvar[cls.to(self.device)][:, comp])
        z = (mu + sd * eps).reshape(n * per_class, d)
        labels = cls.to(self.device).repeat_interleave(per_class)
        return z, labels

    def _expert(self, i: int, epoch: int) -> torch.Tensor:
        key = (i, epoch)
        if key not in self._flat_cache:
            if len(self._flat_cache) > 256:
                self._flat_cache.clear()
            self._flat_cache[key] = self.experts.flat_at(i, epoch).to(self.device)
        return self._flat_cache[key]

    def _aug(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        if self.augment is None:
            return x
        return self.augment(x, torch.Generator().manual_seed(seed))

    def _siamese(self, syn: torch.Tensor, real: torch.Tensor, slots: int, syn_slot: torch.Tensor,
                 real_slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment both batches from one draw of `slots` per-sample parameters: image i of `syn`
        gets slot `syn_slot[i]`, image j of `real` slot `real_slot[j]` (Siamese pairs share one)."""
        if self.augment is None:
            return syn, real
        template = syn.new_empty((slots, *syn.shape[1:]))
        params = self.augment.sample(template, torch.Generator().manual_seed(self._seed()))

        def pick(index: torch.Tensor) -> DSAParams:
            idx = index.to(next(iter(params.values.values())).device) if params.values else index
            return DSAParams(params.transforms, {k: (v if v.shape[0] == 1 else v[idx]) for k, v in params.values.items()})

        return self.augment.apply(syn, pick(syn_slot)), self.augment.apply(real, pick(real_slot))

    def _seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.generator))

    # ---------------------------------------------------------------- objectives
    def _mmd_backward(self) -> float:
        """Sum over the update's classes (`mmd_classes`) of MMD between expert features of decoded
        and real images of the class; gradients accumulate into `.grad`, `mmd_chunk_classes` at a
        time (memory bounded for any class count and image size). Returns the loss.

        A chunk's classes go through the feature network in one batch each (decoded, real); the
        Siamese augmentation gives the j-th decoded and the j-th real image of a class the same
        parameters.
        """
        cfg = self.config
        e = int(torch.randint(self.experts.num_experts, (1,), generator=self.generator))
        feat_params = feature_params(self.net, self._expert(e, self.experts.num_epochs))
        s = cfg.samples_per_class
        total = 0.0
        drawn = self.mmd_classes()
        step = mmd_chunk_classes(cfg, self.metadata.image_shape)
        for lo in range(0, len(drawn), step):
            chunk = drawn[lo:lo + step]
            z, _ = self.sample_latents(s, chunk)
            syn = self.decode(z)
            picks = []
            for c in chunk:
                pool = self._real_index[c]
                picks.append(pool[torch.randperm(len(pool), generator=self.generator)[:cfg.real_per_class]])
            counts = [len(p) for p in picks]
            real = self.real.batch(torch.cat(picks).numpy(), self.device)
            width = max(s, max(counts))
            syn_slot = torch.cat([i * width + torch.arange(s) for i in range(len(chunk))])
            real_slot = torch.cat([i * width + torch.arange(k) for i, k in enumerate(counts)])
            syn, real = self._siamese(syn, real, len(chunk) * width, syn_slot, real_slot)
            loss = feature_mmd(self._features, feat_params, syn, real, s, counts)
            if loss.requires_grad:  # a chunk whose classes all hold under 2 real images adds nothing
                (loss * cfg.mmd_weight).backward()
            total += float(loss.detach()) * cfg.mmd_weight
        return total

    def mmd_classes(self) -> list[int]:
        """The classes of this MMD update: all, or `mmd_classes` of them drawn without replacement
        (in order), so an update costs the same at any class count."""
        m = mmd_class_count(self.config, self.num_classes)
        if m == self.num_classes:
            return list(range(self.num_classes))
        return sorted(int(c) for c in torch.randperm(self.num_classes, generator=self.generator)[:m])

    def _mtt(self) -> float:
        """One trajectory-matching update's gradients (accumulated into .grad); returns the loss."""
        cfg = self.config
        e = int(torch.randint(self.experts.num_experts, (1,), generator=self.generator))
        epochs = self.experts.num_epochs
        top = max(1, min(cfg.max_start_epoch, epochs - cfg.expert_epochs + 1))
        s = int(torch.randint(top, (1,), generator=self.generator))
        start = self._expert(e, s)
        target = self._expert(e, min(s + cfg.expert_epochs, epochs))
        n, k = self.mean.shape[:2]
        per_class = max(1, math.ceil(cfg.unroll_batch / n))
        z, labels = self.sample_latents(per_class)
        images = self.decode(z)
        leaf = images.detach().requires_grad_(True)
        total = leaf.shape[0]
        batches = [torch.randperm(total, generator=self.generator)[:cfg.unroll_batch] for _ in range(cfg.syn_steps)]
        seeds = [self._seed() for _ in range(cfg.syn_steps)]
        res = trajectory_loss(self.net, leaf, labels, start, target, self.syn_lr, batches, augment=self._aug,
                              seeds=seeds, method=cfg.unroll)
        images.backward(leaf.grad)
        self.syn_lr.grad = res.lr_grad.reshape(()).clone()
        return res.loss

    # ---------------------------------------------------------------- one iteration
    def step(self) -> dict[str, float]:
        """One iteration: the objective's update(s) of latents, decoder (and step size)."""
        cfg = self.config
        if self.iteration < cfg.fit_iterations:
            out = {"fit": self._fit_step()}
            self.iteration += 1
            if self.iteration == cfg.fit_iterations:
                with torch.no_grad():
                    self.logvar.fill_(2.0 * math.log(cfg.fit_noise))
            self.last = out
            return out
        final_start = cfg.total_iterations - int(round(cfg.final_fraction * cfg.iterations))
        if not self.frozen and self.iteration >= final_start and cfg.final_fraction > 0 and cfg.iterations > 0:
            self.freeze()
        out = {}
        if "mtt" in cfg.objective:
            self._zero()
            out["mtt"] = self._mtt()
            self.opt_latents.step()
            self.opt_decoder.step()
            self.opt_lr.step()
            with torch.no_grad():
                self.syn_lr.clamp_(min=1e-6)
        if "mmd" in cfg.objective:
            self._zero()
            out["mmd"] = self._mmd_backward()
            self.opt_latents.step()
            self.opt_decoder.step()
        with torch.no_grad():
            self.logvar.clamp_(-8.0, 4.0)
        self.iteration += 1
        self.last = out
        return out

    def _zero(self) -> None:
        for opt in (self.opt_latents, self.opt_decoder, self.opt_lr, self.opt_fit):
            opt.zero_grad(set_to_none=True)

    def _draw_fit_targets(self) -> torch.Tensor:
        """K distinct real images per class (repeating only where a class has fewer than K)."""
        n, k = self.mean.shape[:2]
        rows = []
        for c in range(n):
            pool = self._real_index[c]
            order = torch.cat([torch.randperm(len(pool), generator=self.generator) for _ in range(-(-k // len(pool)))])
            rows.append(pool[order[:k]])
        return torch.stack(rows)

    def prepare_fit(self) -> None:
        """Draw the fit's targets and start the means at their principal-axis codes, once (the first
        fit step does it if not done; `run_loop` does it first, so the fit's progress times steps only)."""
        if self.fit_targets is None:
            self.fit_targets = self._draw_fit_targets()
            with torch.no_grad():
                self.mean.copy_(self._pca_latents(self.fit_targets))

    def _fit_step(self) -> float:
        """One reconstruction iteration: decode (mean + noise) of a batch of components, MSE to each
        component's real image (normalised space); Adam on decoder and means, cosine-decayed lr."""
        cfg = self.config
        self.prepare_fit()
        n, k, d = self.mean.shape
        total = n * k
        pick = torch.randperm(total, generator=self.generator)[:cfg.fit_batch] if total > cfg.fit_batch else torch.arange(total)
        eps = torch.randn(len(pick), d, generator=self.generator).to(self.device)
        lr = cfg.fit_lr * 0.5 * (1.0 + math.cos(math.pi * self.iteration / max(1, cfg.fit_iterations)))
        self.opt_fit.param_groups[0]["lr"] = lr
        self.opt_fit.param_groups[1]["lr"] = 3.0 * lr
        target = self.real.batch(self.fit_targets.reshape(-1)[pick].numpy(), self.device)
        z = self.mean.reshape(total, d)[pick.to(self.device)] + cfg.fit_noise * eps
        loss = (self.decode(z) - target).pow(2).mean()
        self._zero()
        loss.backward()
        self.opt_fit.step()
        return float(loss.detach())

    @torch.no_grad()
    def _pca_latents(self, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """Each target image's coordinates on the top-D principal components of the targets, each
        dimension scaled to std `PCA_CODE_STD`: the fit's starting latents [N, K, D]. As in GLO
        (Bojanowski et al., 2018), similar images start with similar codes, so the decoder learns
        from the first step instead of waiting for random codes to spread (measured: RESULTS.md).
        The basis comes from an evenly spaced subset of the targets (`pca.basis_rows`)."""
        n, k, d = self.mean.shape
        flat = targets.reshape(-1)
        sample = self.real.batch(flat[basis_rows(len(flat))].numpy(), "cpu").flatten(1).double()
        centre = sample.mean(0)
        basis = principal_axes(sample.sub_(centre), d)  # [pixels, <= D]
        del sample
        codes = torch.cat([(self.real.batch(flat[s:s + chunk].numpy(), "cpu").flatten(1).double() - centre) @ basis
                           for s in range(0, len(flat), chunk)])
        if len(codes) > 1:  # unit variance; a direction without spread (rank-deficient targets) starts at 0
            std = codes.std(0)
            live = std > 1e-6 * std.max().clamp_min(1e-30)
            codes = torch.where(live, codes / std.clamp_min(1e-30), torch.zeros_like(codes))
        out = torch.zeros(len(flat), d, dtype=torch.float64)
        out[:, :codes.shape[1]] = codes  # fewer targets or pixels than D: the rest start at 0
        return (PCA_CODE_STD * out).float().reshape(n, k, d).to(self.device)

    @torch.no_grad()
    def freeze(self) -> None:
        """Calibrate BatchNorm statistics on a large draw of the priors, fold them into the
        convolutions and go on with that decoder: the architecture and weights the file stores."""
        for m in self.decoder.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
        self.decoder.train()
        per_class = max(1, self.config.calibration_samples // self.num_classes)
        z, _ = self.sample_latents(per_class)
        for chunk in z.split(512):
            self.decoder(chunk)
        self.decoder.eval()
        hparams, state = fold_batchnorm(self.decoder)
        if hparams != self.plan.hparams:
            raise RuntimeError(f"folded decoder hparams {hparams} differ from the plan's {self.plan.hparams}")
        self._use_folded(state)
        self.frozen = True

    def _use_folded(self, state: dict[str, torch.Tensor]) -> None:
        """Swap in the stored-form decoder (no BatchNorm) with `state`; a fresh Adam for it."""
        folded = build_decoder(self.plan.family, self.plan.version, self.plan.hparams)
        folded.load_state_dict(state)
        self.decoder = folded.to(self.device).eval()
        self.opt_decoder = torch.optim.Adam(self.decoder.parameters(), lr=self.config.lr_decoder, weight_decay=1e-5)

    # ---------------------------------------------------------------- state
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything `load_state` needs to continue identically: tensors and JSON."""
        tensors = {"mean": self.mean.detach(), "logvar": self.logvar.detach(), "syn_lr": self.syn_lr.detach(),
                   "rng": self.generator.get_state()}
        tensors.update({f"decoder.{k}": v.detach() for k, v in self.decoder.state_dict().items()})
        if self.fit_targets is not None:
            tensors["fit_targets"] = self.fit_targets
        meta: dict[str, Any] = {"iteration": self.iteration, "frozen": self.frozen, "last": self.last}
        for name, opt in self._optimizers():
            t, m = optimizer_to_flat(name, opt.state_dict())
            tensors.update(t)
            meta[name] = m
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        with torch.no_grad():
            self.mean.copy_(tensors["mean"])
            self.logvar.copy_(tensors["logvar"])
            self.syn_lr.copy_(tensors["syn_lr"])
        if meta["frozen"] and not self.frozen:
            self._use_folded({k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")})
        self.decoder.load_state_dict({k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")})
        self.generator.set_state(tensors["rng"])
        self.fit_targets = tensors["fit_targets"].clone() if "fit_targets" in tensors else None
        for name, opt in self._optimizers():
            opt.load_state_dict(optimizer_from_flat(name, tensors, meta[name]))
        self.iteration = int(meta["iteration"])
        self.last = dict(meta.get("last", {}))
        self.frozen = bool(meta["frozen"])

    def _optimizers(self) -> tuple[tuple[str, torch.optim.Optimizer], ...]:
        return (("opt_latents", self.opt_latents), ("opt_decoder", self.opt_decoder), ("opt_lr", self.opt_lr),
                ("opt_fit", self.opt_fit))

    def freeze_if_needed(self) -> None:
        """Freeze (calibrate and fold BatchNorm) unless the loop already did: the stored form."""
        if not self.frozen:
            self.freeze()

    @torch.no_grad()
    def mean_image_batches(self, batch_size: int = 512) -> Iterator[torch.Tensor]:
        """Each component's mean image (eval mode, normalised space), `batch_size` at a time,
        class-major: memory of one batch for any K."""
        self.freeze_if_needed()
        n, k, d = self.mean.shape
        flat = self._means().reshape(n * k, d)
        for s in range(0, n * k, batch_size):
            yield self.decode(flat[s:s + batch_size])


def _fake_quant(w: torch.Tensor, weight_dtype: str) -> torch.Tensor:
    """Quantise-dequantise `w` as storage will (straight-through gradient)."""
    if not w.is_floating_point():
        return w
    dtype, axis = tensor_dtype(tuple(w.shape), weight_dtype)
    if dtype != "I8":
        return w
    q = Stored.encode(w.detach(), "I8", axis=axis).dequantize().to(w.device)
    return w + (q - w).detach()


def _init_module(module: nn.Module, generator: torch.Generator) -> None:
    """Seeded default init of every conv/linear/norm layer."""
    init_params(module, generator)
