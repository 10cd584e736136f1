"""WISE hyper-parameters (spec 4.7): the seed's for the 7-8B models, a first choice for the default model.

The seed's yamls: layer 27 (llama-2-7b, mistral-7b) / 29 (llama-3-8b) down_proj, mask 0.2, SGD
1.0 (0.9) x 70 (30), norm constraint 1.0, margins (5, 20, 10) / (2, 20, 10), act_ratio 0.88 / 0.5,
save / merge every 500 / 1000 edits, TIES at density 0.53, weight 1.0. The seed has no Qwen2.5 or
GPT-J config; EasyEdit's are borrowed. Llama-3-8B (the seed) and Qwen2.5 (EasyEdit) set
``use_chat_template``: their edit rows, and the synthetic evaluation's prompts, are chat-wrapped. The router defaults to
the seed's 'sequence' (re-decided over the growing answer); ``--hp router=prompt`` decides once.
"""

from mirage_jax.editing.wise import WISEConfig

WISE = {
    "llama-2-7b": WISEConfig(layer=27),
    "mistral-7b": WISEConfig(layer=27),
    "llama-3-8b": WISEConfig(layer=29, edit_lr=0.9, n_iter=30, act_margin=(2.0, 20.0, 10.0), act_ratio=0.5,
                             use_chat_template=True),
    # EasyEdit hparams/WISE/qwen2.5-7b.yaml (no seed config)
    "qwen2.5-7b": WISEConfig(layer=23, use_chat_template=True),
    # EasyEdit hparams/WISE/gpt-j-6B.yaml (no seed config); fc_out's bias is kept under every memory
    "gpt-j": WISEConfig(layer=21, act_margin=(15.0, 40.0, 20.0)),
    # Default model (SmolLM2-135M, 30 layers): layer 24, GRACE's measured choice (0.8 depth, the paper's
    # 27/32); not yet measured for WISE itself (see BUILD_NOTES, WISE).
    "smollm2-135m": WISEConfig(layer=24),
}
