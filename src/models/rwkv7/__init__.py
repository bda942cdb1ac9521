"""The RWKV-7 ("x070", "Goose") model family: everything the toolkit knows about this architecture lives in this
package.

    family.py     the registry's record of this family (src/models/family.py): what the rest of the toolkit asks
    model.py      RWKV7Model, built from forward pieces (embed, first_carry, run_block with v_first as the carry,
                  state_of_layers, logits, head_loss, token_losses); generate_init_weights (BlinkDL's rules)
    wkv.py        the WKV-7 operator (state in, state out) and its plain-torch twin; wkv_cuda.py and cuda/ the kernel
    state.py      RWKV7State (per layer: token shifts and the WKV-7 state), initial_state
    anatomy.py    the toolkit's questions about parameter names (forward piece, LR and weight-decay groups, LoRA, ...)
    config.py     RWKV7Config (the shape), ForwardOptions (how the forward runs); no torch
    flags.py      its shape flags (--head_size, the low-rank widths); no torch

Import the modules themselves: this file imports nothing, so `src.models.rwkv7.config` and `src.models.rwkv7.anatomy`
load without torch.
"""
