"""benchmarks/attacks.py names the CPU, its vector extensions, TensorFlow's oneDNN setting and any oneDNN
instruction-set cap before its figures (speed figures hold for one instruction set). No timing here."""

from __future__ import annotations

from conftest import REPO, load_script


def _benchmark():
    return load_script(REPO / "benchmarks" / "attacks.py", "bench_attacks")


AVX512_CPU = ("processor : 0\nmodel name : AMD EPYC 9R14\ncpu family : 25\nmodel : 17\n"
              "flags : fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16\n\n"
              "processor : 1\nmodel name : AMD EPYC 9R14\nflags : fpu\n")
AVX2_CPU = "model name : AMD EPYC 7B13\nflags : fpu sse2 avx avx2 fma\n"


def test_names_cpu_extensions_and_onednn_setting():
    lines = _benchmark().cpu_report(AVX512_CPU, environ={})
    assert "AMD EPYC 9R14 (family 25, model 17)" in lines[0]
    assert "AVX2 FMA AVX-512 AVX512-VNNI AVX512-BF16 (no AMX)" in lines[0]
    assert lines[1].startswith("TensorFlow oneDNN: on") and "unset" in lines[1]
    assert "none" in lines[2]
    off = _benchmark().cpu_report(AVX2_CPU, environ={"TF_ENABLE_ONEDNN_OPTS": "0"})
    assert "AVX2 FMA (no AVX-512, no AMX)" in off[0] and off[1].startswith("TensorFlow oneDNN: off")


def test_an_avx2_cap_on_an_avx512_cpu_is_called_an_emulation():
    bench = _benchmark()
    capped = bench.cpu_report(AVX512_CPU, environ={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in capped[2] and "EMULATED" in capped[2] and "not a real AVX2" in capped[2]
    old_name = bench.cpu_report(AVX512_CPU, environ={"DNNL_MAX_CPU_ISA": "avx2"})
    assert "DNNL_MAX_CPU_ISA=avx2" in old_name[2] and "EMULATED" in old_name[2]
    on_avx2 = bench.cpu_report(AVX2_CPU, environ={"ONEDNN_MAX_CPU_ISA": "AVX2"})  # a cap the CPU is at anyway
    assert "EMULATED" not in on_avx2[2]


def test_without_cpuinfo_the_extensions_are_unknown():
    lines = _benchmark().cpu_report("", environ={})
    assert "unknown" in lines[0] and len(lines) == 3
