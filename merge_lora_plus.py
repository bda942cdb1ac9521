"""merge_lora.py with --layer_filter: merge only some layers, each with its own coefficient.

    python merge_lora_plus.py [--use-gpu] [--layer_filter "0.5*0-15 1*16-31"] [lora_alpha] base.pth lora.pth out.pth

--layer_filter lists layers (ids or inclusive ranges), each optionally prefixed by `coef*`: the LoRA
update of a listed layer is multiplied by its coefficient (time/ln values are taken as they are);
LoRA tensors of unlisted layers are ignored. Without --layer_filter this is merge_lora.py exactly.
The merge is checked against the unmerged model with the same coefficients before anything is written.
"""
from src import cli
from src.lora import merge_cli


def main(argv=None) -> int:
    return merge_cli.run(argv, "merge_lora_plus.py", __doc__.split("\n\n")[0], layer_filter=True)


if __name__ == "__main__":
    cli.exit_process(main())
