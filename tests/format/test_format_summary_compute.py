"""`d3codec info` shows what an encoded file's bytes depend on: the `compute` provenance record
(torch version, device, CPU capability, intra-op threads), one line per part when parts differ."""
from click.testing import CliRunner

from d3codec.cli import cli
from d3codec.format import load, save
from d3codec.format.summary import describe, render
from d3codec.format.testing import random_d3

CPU = {"torch": "2.13.0+cpu", "device": "cpu", "cpu_capability": "AVX512", "threads": 2}


def _file(tmp_path, provenance):
    d3 = random_d3(0)
    d3.provenance = provenance
    path = tmp_path / "f.d3"
    save(d3, path)
    return load(path), str(path)


def test_info_shows_the_compute_record(tmp_path):
    d3, path = _file(tmp_path, {"encoder": "d3codec 0.1.0", "compute": CPU})
    assert "encoded   torch 2.13.0+cpu on cpu, CPU capability AVX512, 2 threads" in render(d3, path).splitlines()
    assert describe(d3)["provenance"]["compute"] == CPU  # info --json: inside provenance, as stored
    out = CliRunner().invoke(cli, ["info", path])
    assert out.exit_code == 0 and "CPU capability AVX512, 2 threads" in out.output


def test_info_shows_one_line_per_part_when_merged_parts_differ(tmp_path):
    other = {**CPU, "cpu_capability": "AVX2", "threads": 1}
    d3, path = _file(tmp_path, {"compute": [CPU, other]})
    lines = render(d3, path).splitlines()
    assert "encoded   part 0: torch 2.13.0+cpu on cpu, CPU capability AVX512, 2 threads" in lines
    assert "encoded   part 1: torch 2.13.0+cpu on cpu, CPU capability AVX2, 1 thread" in lines


def test_info_of_a_gpu_encode_names_the_gpu(tmp_path):
    gpu = {**CPU, "device": "cuda", "cuda": "12.8", "gpu": "NVIDIA H100"}
    d3, path = _file(tmp_path, {"compute": gpu})
    assert "encoded   torch 2.13.0+cpu on cuda (NVIDIA H100, CUDA 12.8), CPU capability AVX512, 2 threads" \
        in render(d3, path).splitlines()


def test_files_without_a_compute_record_show_no_such_line(tmp_path):
    d3, path = _file(tmp_path, {"encoder": "d3codec 0.1.0"})
    assert not any(line.startswith("encoded") for line in render(d3, path).splitlines())
