"""The RWKV-4 ("v4neo") model family: everything the toolkit knows about this architecture lives in this package.

    config.py     RWKVConfig (the shape), ForwardOptions (how the forward runs), default_widths, windowed_features
    family.py     the registry's record of this family (src/models/family.py): what the rest of the toolkit asks
    model.py      RWKV, built from forward pieces (embed, first_carry, run_block, state_of_layers, logits,
                  head_loss, token_losses); generate_init_weights
    state.py      RWKVState (per layer: token shifts and WKV sums), initial_state, empty_state
    anatomy.py    the toolkit's questions about parameter names (forward piece, LR multiplier, LoRA targets, ...)
    wkv.py        the WKV operator and its torch twin; wkv_cuda.py and cuda/ the kernel
    elementwise.py  the elementwise work between a block's projections, and its fused (torch.compile) twin
    hf_format.py  the same model in transformers' RwkvForCausalLM format

Import the modules themselves: this file imports nothing, so `src.models.rwkv4.config` and `src.models.rwkv4.anatomy` load
without torch.
"""
