"""`--device auto` (the default): CUDA when torch sees a GPU, else the CPU; a CUDA request where
there is none, or an unknown device, is one `error:` line before any work."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from d3codec.cli import _resolve_device, cli
from d3codec.decode import D3Dataset
from d3codec.decode.decoders import check_device
from d3codec.errors import ConfigError
from d3codec.format.testing import random_d3
from d3codec.format.types import D3File, DecoderEntry, Metadata, Priors, Stored
from d3codec.models import build_decoder


def digits_shaped_file(meta: Metadata) -> D3File:
    """A decodable 10-class 8x8 file (small decoder, random weights) with `meta`'s classes and normalisation."""
    hparams = {"channels": 1, "image_size": 8, "latent_dim": 4, "width": 16}
    decoder = build_decoder("small", 1, hparams)
    g = torch.Generator().manual_seed(0)
    weights = {k: Stored.encode(v) for k, v in decoder.state_dict().items()}
    return random_d3(0, num_classes=10, image_shape=(1, 8, 8), latents_per_class=2, dim=4).replace(
        metadata=meta, priors=Priors(kind="diag", mean=Stored.encode(torch.randn(10, 2, 4, generator=g)),
                                     logvar=Stored.encode(torch.zeros(10, 2, 4))),
        decoders=[DecoderEntry("small", 1, hparams, list(range(10)), weights)])

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")


def test_auto_is_cuda_when_available_else_cpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert check_device("auto") == torch.device(expected)
    assert check_device() == torch.device(expected)
    assert _resolve_device(None, None, "auto") == expected  # type: ignore[arg-type]


def test_auto_resolves_to_cuda_when_torch_sees_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert check_device("auto") == torch.device("cuda")
    assert check_device("AUTO") == torch.device("cuda")
    assert _resolve_device(None, None, "auto") == "cuda"  # type: ignore[arg-type]


def test_auto_resolves_to_cpu_when_torch_sees_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="use cpu, or auto"):
        check_device("cuda")


@pytest.mark.parametrize("name", ["tpu", "mps", "meta", "", "cuda:x"])
def test_unknown_or_unsupported_devices_are_config_errors(name: str) -> None:
    with pytest.raises(ConfigError, match="use auto, cpu or cuda"):
        check_device(name)


@no_cuda
def test_dataset_defaults_to_auto() -> None:
    meta = Metadata(name="t", num_classes=10, class_names=[str(i) for i in range(10)], image_shape=(1, 8, 8),
                    mean=(0.5,), std=(0.25,))
    ds = D3Dataset(digits_shaped_file(meta), batch_size=4)
    assert ds.device == torch.device("cpu") and next(iter(ds))[0].device.type == "cpu"
    with pytest.raises(ConfigError, match="CUDA"):
        D3Dataset(digits_shaped_file(meta), batch_size=4, device="cuda")


COMMANDS = {
    "encode": ["encode", "digits", "--budget", "1ipc", "-o", "{tmp}/out.d3"],
    "eval": ["eval", "{tmp}/in.d3", "--test", "digits"],
    "sample": ["sample", "{tmp}/in.d3", "-o", "{tmp}/grid.png"],
    "merge": ["merge", "{tmp}/a.d3", "-o", "{tmp}/out.d3"],
    "experts": ["experts", "digits"],
}


@no_cuda
@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "tpu"])
def test_cli_refuses_cuda_without_cuda_and_unknown_devices(tmp_path, command: str, device: str) -> None:
    name, *rest = [a.format(tmp=tmp_path) for a in COMMANDS[command]]
    result = CliRunner().invoke(cli, [name, "--device", device, *rest])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    assert ("cpu" in lines[0]) and ("auto" in lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, no work done


def test_every_command_with_a_device_defaults_to_auto() -> None:
    for name, command in cli.commands.items():
        for param in command.params:
            if param.name == "device":
                assert param.default == "auto", name
                assert "auto" in (param.help or ""), name


def test_eval_report_names_the_device_that_ran(tmp_path) -> None:
    from d3codec.data import open_dataset
    from d3codec.evaluate import Recipe, evaluate_file
    from d3codec.format.io import save

    test = open_dataset("digits", split="test", cache_dir=str(tmp_path / "cache"), progress=False)
    path = str(tmp_path / "d.d3")
    save(digits_shaped_file(test.metadata()), path)
    report = evaluate_file(path, test, Recipe(steps=1, runs=1, batch_size=8), progress=False)
    assert report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
