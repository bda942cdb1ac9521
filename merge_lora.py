"""Merge a LoRA checkpoint into its base model, giving one .pth that ChatRWKV and the rwkv pip package load.

    python merge_lora.py [--use-gpu] [lora_alpha] base_model.pth lora_checkpoint.pth output.pth

The original toolkit's command line works unchanged. LoRA files written by this toolkit store their
alpha, so it may be left out; given anyway, it must agree with the stored one. Files of the original
toolkit store nothing, so they need it.

The merge runs in fp32 (ΔW = alpha/r · B A added to W; trained time/ln values replace the base's),
then the result is checked: logits of the merged model must match those of base + LoRA on a few
tokens, or nothing is written. The output has the base's keys, each in the base's dtype, and is
written atomically.
"""
from src import cli
from src.lora import merge_cli


def main(argv=None) -> int:
    return merge_cli.run(argv, "merge_lora.py", __doc__.split("\n\n")[0], layer_filter=False)


if __name__ == "__main__":
    cli.exit_process(main())
