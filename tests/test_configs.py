"""`--hp` overrides are parsed by each field's declared type, and the shared CLI flags are defined once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

from configs import HparamError, apply_overrides, get_hparams
from mirage_jax.editing.ft import FTConfig
from mirage_jax.editing.memit import MEMITConfig
from mirage_jax.editing.rome import ROMEConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override, field, want", [
    ("layers=4", "layers", (4,)),
    ("v_lr=1e-2", "v_lr", 0.01),
    ("v_lr=1", "v_lr", 1.0),
    ("v_num_grad_steps=7", "v_num_grad_steps", 7),
    ("mom2_adjustment=true", "mom2_adjustment", True),
    ("mom2_adjustment=False", "mom2_adjustment", False),
    ("context_template_length_params=[[5, 5], [10, 5]]", "context_template_length_params", ((5, 5), (10, 5))),
    ("variant=r-rome", "variant", "r-rome"),
])
def test_rome_fields_parse_by_declared_type(override, field, want):
    got = getattr(apply_overrides(ROMEConfig(), [override]), field)
    assert got == want and type(got) is type(want)


def test_tuples_optionals_and_counts():
    assert apply_overrides(MEMITConfig(), ["layers=3,4, 5"]).layers == (3, 4, 5)
    assert apply_overrides(MEMITConfig(), ["layers=[3, 4]"]).layers == (3, 4)
    assert apply_overrides(MEMITConfig(), ["mom2_n_samples=1e4"]).mom2_n_samples == 10000
    assert apply_overrides(FTConfig(), ["norm_constraint=none"]).norm_constraint is None
    assert apply_overrides(FTConfig(), ["norm_constraint=5e-4"]).norm_constraint == 5e-4
    mend = get_hparams("MEND", "smollm2-135m", ['inner_params=[[20, "up"], [21, "down"]]', "archive=/a/b"])
    assert mend.inner_params == ((20, "up"), (21, "down")) and mend.archive == "/a/b"
    assert get_hparams("MEND", "smollm2-135m", ["archive=none"]).archive is None


@pytest.mark.parametrize("override, words", [
    ("v_lr=abc", ["v_lr", "float", "'abc'"]),
    ("v_num_grad_steps=2.5", ["v_num_grad_steps", "int", "'2.5'"]),
    ("mom2_adjustment=maybe", ["mom2_adjustment", "bool", "'maybe'"]),
    ("layers=a", ["layers", "tuple[int, ...]", "'a'"]),
    ("context_template_length_params=[[5, 5, 1]]", ["context_template_length_params", "3 items"]),
    ("nope=1", ["bad override", "v_lr"]),
    ("v_lr", ["bad override"]),
])
def test_wrong_value_names_field_type_and_input(override, words):
    """Before: a wrong value was stored as a string ('abc' for a learning rate) and failed deep inside JAX."""
    with pytest.raises(HparamError) as err:
        apply_overrides(ROMEConfig(), [override])
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_optional_float_rejects_words():
    with pytest.raises(HparamError, match=r"FTConfig.norm_constraint is float \| None, got 'big'"):
        apply_overrides(FTConfig(), ["norm_constraint=big"])


def test_model_flags_are_defined_once_and_shared():
    """Defining the shared flags twice in one process (two CLIs imported together) must not collide,
    and every entry point's --help lists them with one help text."""
    from mirage_jax import cli

    fv = flags.FlagValues()
    cli.define_model_flags(fv)
    cli.define_model_flags(fv)
    cli.define_hparam_flags(fv)
    fv(["prog", "--model=x.gguf", "--dtype=bfloat16", "--hp", "a=1", "--hp", "b=2"])
    assert (fv.model, fv.dtype, fv.allow_pickle, fv.hp) == ("x.gguf", "bfloat16", False, ["a=1", "b=2"])


@pytest.mark.parametrize("command", [
    ["launch.py"], ["-m", "mirage_jax.generate"], ["-m", "mirage_jax.editing.stats"],
    ["-m", "mirage_jax.editing.mend_train"],
])
def test_every_cli_lists_the_shared_flags(command):
    out = subprocess.run([sys.executable, *command, "--help"], cwd=REPO, capture_output=True, text=True,
                         check=False, timeout=120)
    text = out.stdout + out.stderr
    for flag in ("--model: 'default' (the embedded SmolLM2-135M-Instruct)", "--dtype", "--[no]allow_pickle"):
        assert flag in text, (command, text[-2000:])
    # `python -m pkg.mod` warns when the package already imported the module it runs.
    assert "RuntimeWarning" not in text, text[-2000:]
