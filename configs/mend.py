"""MEND hyper-parameters (spec 4.5): the paper's values for Llama-2-7B / Mistral-7B, ours for the rest.

`archive` is None everywhere: no trained editor ships (the seed's checkpoints are not released and
its training data is not shipped). In library use, `archive=None` is the untrained editor (one SGD step
of `edit_lr` on the inner matrices). `launch.py --method=MEND` insists on a trained one: `--hp
archive=<dir>`, else `results/mend/<model name>/best`, else it trains one there first from
`--mend_train_data=<CounterFact file>` (records 5000+, `mend_training_edits`; `--mend_train_steps`),
else it stops with a one-line error. In Python: `mend_train.train_editor(...)` (validation, early stopping,
best/latest checkpoints, resume).
"""

from mirage_jax.editing.mend import MATRICES, MENDConfig


def _last_three(num_layers: int) -> tuple[tuple[int, str], ...]:
    return tuple((l, n) for l in range(num_layers - 3, num_layers) for n in MATRICES)


MEND = {
    # Paper (EasyEdit hparams/MEND): layers 29-31 gate/up/down, rank 1920, edit_lr 1e-4.
    "llama-2-7b": MENDConfig(inner_params=_last_three(32)),
    "mistral-7b": MENDConfig(inner_params=_last_three(32)),
    # Not in the paper (no MEND for Llama-3 there): the same last three layers.
    "llama-3-8b": MENDConfig(inner_params=_last_three(32)),
    "qwen2.5-7b": MENDConfig(inner_params=_last_three(28)),
    # Default model (30 layers, d=576, d_ff=1536): the last three layers.
    "smollm2-135m": MENDConfig(inner_params=_last_three(30)),
}
