"""Meta-train a MEND editor from the command line (launch.py trains on demand with the same
`train_editor`; this is the explicit train command, e.g. for a long run on an accelerator):

    python -m mirage_jax.editing.mend_train --train_data=../shared/data/counterfact-edit.json \
        --steps=300 --val_size=20 --limit=2000 --val_every=50 --hp lr=1e-4 --hp rank=256

The editor lands in ``results/mend/<model>/best`` (where launch.py looks), its score and
architecture in ``best.json``; a killed run continues from ``latest/`` when started again.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

from mirage_jax.editing import mend as lib


def main(argv: Sequence[str]) -> None:
    """Train, print where the editor is and how to use it."""
    from absl import flags

    from configs import get_hparams
    from mirage_jax.model import load_model

    f = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        model = load_model(f.model, dtype=f.dtype)
        hp = get_hparams("MEND", model.name, f.hp, key=f.hparams_for)
        data = lib.mend_training_edits(f.train_data, start=f.start, val_size=f.val_size, limit=f.limit)
        out = os.path.abspath(f.out_dir or lib.default_archive_dir(model.name))
        _, info = lib.train_editor(model.params, model.cfg, model.tokenizer, data, hp, f.steps, out_dir=out,
                                   val_every=f.val_every, patience=f.patience, resume=f.resume, seed=f.seed)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"{len(data.edits)} training edits, {len(data.val_edits)} validation edits; stopped at step "
          f"{info['step']}{' (early)' if info['stopped_early'] else ''}; best validation edit success "
          f"{info['best_score']:.3f} at step {info['best_step']}")
    print(f"editor: {os.path.join(out, 'best')}  (python launch.py --method=MEND --hp archive={os.path.join(out, 'best')})")


def _flags() -> None:
    from absl import flags

    flags.DEFINE_string("model", "default", "'default', an HF checkpoint directory or a .gguf file")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "parameter dtype")
    flags.DEFINE_string("train_data", None, "ZsRE training split (MEND format) or a CounterFact file", required=True)
    flags.DEFINE_integer("steps", 1000, "meta-training steps (one edit + one locality pair each)")
    flags.DEFINE_string("out_dir", None, "checkpoint directory (default results/mend/<model>; best/ is the editor)")
    flags.DEFINE_multi_string("hp", [], "MENDConfig override key=value (repeatable), e.g. rank=256, crephrase=0.1")
    flags.DEFINE_string("hparams_for", None, "borrow the configs/ entry of this model key")
    flags.DEFINE_integer("start", None, "first record used (default: 5000 for CounterFact, 0 for ZsRE)")
    flags.DEFINE_integer("val_size", 200, "held-out validation edits (the last records used)")
    flags.DEFINE_integer("limit", None, "use at most this many records")
    flags.DEFINE_integer("val_every", 100, "steps between validations (and checkpoints)")
    flags.DEFINE_integer("patience", 5, "validations without improvement before stopping")
    flags.DEFINE_integer("seed", 0, "data order seed")
    flags.DEFINE_bool("resume", True, "continue from <out_dir>/latest when it exists")


if __name__ == "__main__":
    from absl import app

    _flags()
    app.run(main)
