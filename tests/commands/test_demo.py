"""The demo's building blocks on a tiny random Llama (the real demo takes minutes)."""

import pytest
import torch

from easyquant import QuantConfig, cli
from easyquant.commands.demo import DemoRow, average_bits, compare, demo_methods, format_table
from easyquant.config import preset_overrides
from easyquant.models.select import TensorReport


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def test_compare_measures_every_method_on_the_same_windows(tiny_llama):
    ids = torch.randint(0, 64, (1000,), generator=torch.Generator().manual_seed(1))
    methods = [
        ("RTN 2-bit", QuantConfig(bits=2, method="rtn", outlier_sigma=None), {}),
        ("EasyQuant 2-bit", QuantConfig.paper(bits=2, steps=20), {}),
    ]
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    rows = compare(tiny_llama, ids, methods, seq_len=100, windows=3)
    assert [r.method for r in rows] == ["full precision", "RTN 2-bit", "EasyQuant 2-bit"]
    assert rows[0].bits_per_weight is None and rows[0].quantized == 0
    assert all(r.quantized == 14 for r in rows[1:])  # 7 Linear weights x 2 decoder layers
    assert all(2.0 < r.bits_per_weight < 3.0 for r in rows[1:])
    assert all(r.ppl > 0 and r.seconds >= 0 for r in rows[1:])
    # The model itself is left as it was: each method quantizes a copy.
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("QuantLinear" in type(m).__name__ for m in tiny_llama.modules())
    table = format_table(rows)
    assert "RTN 2-bit" in table and "16/32" in table and len(table.splitlines()) == 5


def test_average_bits_weights_by_size():
    def report(rows, cols, bpw):
        return TensorReport("w", (rows, cols), 4, None, 0.0, bpw, 0.0, 0.0, 0.0)

    assert average_bits([report(1, 100, 4.0), report(3, 100, 5.0)]) == pytest.approx(4.75)


def test_demo_rows_are_rtn_then_easyquant_presets():
    labels = [label for label, _, _ in demo_methods(3)]
    assert labels[0].startswith("RTN") and "paper" in labels[1]
    configs = [c for _, c, _ in demo_methods(3)]
    assert all(c.bits == 3 for c in configs)
    assert configs[1] == QuantConfig.paper(bits=3)
    assert all(not overrides for _, _, overrides in demo_methods(3))
    assert len(demo_methods(3)) == 3  # the quality preset is the best one at 3 bits: no row
    # at 4 bits the quality preset's per-module changes come with it
    assert [label for label, _, _ in demo_methods(4)][2:] == ["EasyQuant (best)",
                                                             "EasyQuant (quality)"]  # fmt: skip
    (_, quality, overrides) = demo_methods(4)[3]
    assert quality == QuantConfig.quality() and overrides == preset_overrides("quality", quality)
    assert overrides != {}


def test_compare_applies_each_methods_overrides_after_the_selection(tiny_llama):
    from easyquant.models.select import Selection

    ids = torch.randint(0, 64, (400,), generator=torch.Generator().manual_seed(2))
    base = QuantConfig(bits=4, method="rtn", outlier_sigma=None)
    methods = [("kv at 8 bits", base, {"*.k_proj": {"bits": 8}, "*.v_proj": {"bits": 8}})]
    only_layer_0 = Selection.build(include=["*layers.0.*"], overrides={"*.v_proj": {"bits": 2}})
    rows = compare(tiny_llama, ids, methods, seq_len=100, windows=2, selection=only_layer_0)
    assert rows[1].quantized == 7
    # k_proj 8 bits, v_proj 2 (the selection's own override wins), the five others 4
    shapes = {"q": 64 * 64, "k": 32 * 64, "v": 32 * 64, "o": 64 * 64, "mlp": 3 * 64 * 128}
    bits = 4 * (shapes["q"] + shapes["o"] + shapes["mlp"]) + 8 * shapes["k"] + 2 * shapes["v"]
    codes_only = bits / sum(shapes.values())
    assert codes_only < rows[1].bits_per_weight < codes_only + 0.3  # plus the scales


def test_demo_missing_text_is_one_line(tmp_path, capsys):
    code = cli.main(["demo", "--text", str(tmp_path / "none.txt")])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and err.count("\n") == 1


def test_format_table_has_one_row_per_method():
    rows = [DemoRow("full precision", 19.3, None, None, 0), DemoRow("RTN", 41.5, 4.07, 1.5, 210)]
    lines = format_table(rows).splitlines()
    assert len(lines) == 4 and "41.50" in lines[3] and "4.070" in lines[3]


def test_bench_quality_reaches_the_benchmark_script():
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run(
        [sys.executable, "-m", "easyquant", "bench", "quality", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--windows" in proc.stdout and "--methods" in proc.stdout
