"""`--dtype auto`: the choice from injected device facts, the real machine's flags, the commands' defaults, the
header and summary.json of a run, and serving a bfloat16 base (greedy tokens equal HF PEFT's bf16 generation)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from peftkit import precision
from peftkit.cli import build_parser, main
from peftkit.train import options as opts

sys.path.insert(0, str(Path(__file__).parent / "serve"))
from serve_helpers import make_adapters  # noqa: E402

AVX2 = "fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2"
CPUINFO = f"processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: {AVX2}\n\nprocessor\t: 1\n"


@pytest.mark.parametrize("device, flags, cuda_bf16, want, said", [
    ("cpu", AVX2.split(), False, "float32", "neither amx_bf16 nor avx512_bf16"),
    ("cpu", [*AVX2.split(), "avx512f", "avx512_bf16"], False, "bfloat16", "avx512_bf16"),
    ("cpu", [*AVX2.split(), "amx_tile", "amx_bf16", "avx512_bf16"], False, "bfloat16", "amx_bf16 and avx512_bf16"),
    ("cpu", [*AVX2.split(), "avx512f"], False, "float32", "neither"),  # AVX-512 without its BF16 extension
    ("cpu", None, False, "float32", "cannot be read"),
    ("cuda", None, True, "bfloat16", "supports bfloat16"),
    ("cuda", None, False, "float32", "no native bfloat16"),
    ("mps", None, True, "float32", "not verified"),
])
def test_auto_follows_the_device_facts(device, flags, cuda_bf16, want, said):
    choice = precision.choose_dtype("auto", device, flags, cuda_bf16)
    assert choice.dtype == want and said in choice.reason and choice.reason.startswith("auto: ")
    assert choice.as_dict() == {"dtype": want, "dtype_reason": choice.reason}


def test_an_explicit_dtype_wins_and_a_bad_one_is_refused_naming_the_choices():
    for name in precision.DTYPES:
        assert precision.choose_dtype(name, "cpu", ["amx_bf16", "amx_fp16"]).as_dict() == {
            "dtype": name, "dtype_reason": f"--dtype {name}"}
    assert precision.resolve_dtype("float16").torch_dtype() is torch.float16
    with pytest.raises(ValueError, match="auto, float32, bfloat16, float16"):
        precision.choose_dtype("bf16", "cpu")
    with pytest.raises(ValueError, match="not a torch device.*cuda:N"):
        precision.resolve_dtype("auto", "gpu0")


@pytest.mark.parametrize("name, flags, warned", [
    ("bfloat16", AVX2.split(), True),
    ("bfloat16", [*AVX2.split(), "avx512_bf16"], False),
    ("float16", [*AVX2.split(), "amx_bf16"], True),  # bf16 units do not make float16 fast
    ("float16", [*AVX2.split(), "avx512_fp16"], False),
    ("float32", AVX2.split(), False),
    ("bfloat16", None, False),  # unknown flags: nothing to warn about
    ("bfloat16", "fp asimd asimdhp bf16 sve".split(), False),  # ARM (Graviton 3) names its units otherwise
])
def test_an_explicit_16_bit_dtype_on_a_cpu_without_its_units_is_kept_with_a_warning(name, flags, warned):
    choice = precision.choose_dtype(name, "cpu", flags)
    assert choice.dtype == name and choice.reason.startswith(f"--dtype {name}")
    assert ("warning" in choice.reason) is warned
    if warned:
        assert "slower than float32" in choice.reason and "auto picks float32" in choice.reason
    assert "warning" not in precision.choose_dtype(name, "cuda", flags).reason


def test_resolve_warns_of_an_explicit_bf16_by_this_machines_own_flags():
    flags = precision.cpu_flags()
    choice = precision.resolve_dtype("bfloat16", "cpu")
    assert choice.dtype == "bfloat16"
    x86 = flags is not None and "sse2" in flags
    assert ("warning" in choice.reason) is (x86 and not set(precision.CPU_BF16_FLAGS) & flags)


def test_cpu_flags_are_read_from_cpuinfo_text_and_files(tmp_path):
    assert precision.parse_cpu_flags(CPUINFO) == frozenset(AVX2.split())
    assert precision.parse_cpu_flags("processor : 0\nFeatures : fp asimd bf16\n") == {"fp", "asimd", "bf16"}  # ARM
    assert precision.parse_cpu_flags("nothing here\n") == frozenset()
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.replace("avx2", "avx2 avx512_bf16"))
    assert "avx512_bf16" in precision.cpu_flags(str(path))
    assert precision.cpu_flags(str(tmp_path / "missing")) is None


def test_auto_on_this_machine_agrees_with_its_own_flags():
    """The real /proc/cpuinfo (or its absence): auto picks bfloat16 on this CPU exactly when it has a bf16 flag."""
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.split(":")[0].strip() in
                    ("flags", "Features"))
        flags = set(line.split(":", 1)[1].split())
    except (OSError, StopIteration):
        flags = None
    choice = precision.resolve_dtype("auto", "cpu")
    fast = flags is not None and bool({"amx_bf16", "avx512_bf16"} & flags)
    assert choice.dtype == ("bfloat16" if fast else "float32"), choice
    facts = precision.machine_facts()
    assert facts["bf16_flags"] == [f for f in precision.CPU_BF16_FLAGS if flags and f in flags]


def test_auto_is_the_default_of_train_serve_eval_and_generate():
    assert opts.TrainOptions().dtype == "auto" and opts.build({}).dtype == "auto"
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16"):
        opts.build({"dtype": "fp8"})
    parser = build_parser()
    for argv in (["train"], ["serve"], ["eval"], ["generate", "hi"], ["chat"]):
        assert parser.parse_args(argv).dtype in (None, "auto"), argv  # train: None means the option's default
    assert parser.parse_args(["serve", "--dtype", "bfloat16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--dtype", "fp8"])


def test_train_prints_and_records_the_choice(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(4)))
    before = torch.get_num_threads()
    try:
        assert main(["train", "--model", tiny_model_dir, "--data", str(data), "--output-dir", str(tmp_path / "run"),
                     "--max-steps", "1", "--batch-size", "2", "--val-fraction", "0", "--save-every", "0",
                     "--eval-examples", "0", "--no-progress", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(before)
    expected = precision.resolve_dtype("auto", "cpu")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["dtype"], summary["dtype_reason"]) == (expected.dtype, expected.reason)
    assert f"peftkit train: base dtype {expected.dtype} ({expected.reason})" in capsys.readouterr().out
    # run_options.json holds the dtype auto meant, so a resume where auto means another dtype is refused
    assert json.loads((tmp_path / "run" / "run_options.json").read_text())["dtype"] == expected.dtype


@pytest.fixture
def one_thread():
    """One torch thread for the test (as the serve tests use): a shared machine's busy cores never stall it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_bf16_base_serves_with_fp32_slots_and_a_bf16_cache_and_equals_peft(tmp_path, monkeypatch, one_thread):
    """The engine on a bfloat16 tiny Llama: the adapters computed in fp32 and added once rounded (as PEFT's
    autocast_adapter_dtype does), the base and the KV cache in bf16; greedy tokens equal HF PEFT's generate()."""
    from peft import PeftModel

    from peftkit.hf import kv_tensors
    from peftkit.serve import AdapterRegistry, Engine, GenRequest

    paths = make_adapters(tmp_path)
    cases = [(None, 5), ("alpha", 9), ("beta", 3), ("gamma", 12), ("gamma", 4)]
    prompts = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(i)).tolist()
               for i, (_, n) in enumerate(cases)]
    model = tiny_llama().to(torch.bfloat16)
    registry = AdapterRegistry(model, adapters=paths, max_loaded=4)
    engine = Engine(model, registry, max_batch=8)
    caches = []
    real = engine._forward
    monkeypatch.setattr(engine, "_forward", lambda *a: (lambda r: caches.append(r[1]) or r)(real(*a)))
    handles = [engine.submit(GenRequest(p, name, 10)) for p, (name, _) in zip(prompts, cases)]
    engine.start()
    try:
        for h in handles:
            h.wait(60)
    finally:
        engine.close()
    assert registry.bank.dtype() is torch.float32
    assert {k.dtype for c in caches for k, v in kv_tensors(c)} == {torch.bfloat16}
    for prompt, (name, _), h in zip(prompts, cases, handles):
        base = tiny_llama().to(torch.bfloat16)
        ref = PeftModel.from_pretrained(base, str(paths[name])).eval() if name else base.eval()
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
        assert h.token_ids == out[0, len(prompt):].tolist(), name
