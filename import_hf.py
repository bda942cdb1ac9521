"""Import a Hugging Face transformers RWKV-4 folder (RwkvForCausalLM) as a v4neo .pth, checked logit for logit.

    python import_hf.py [--overwrite] HF_DIR OUT.pth

OUT.pth is a plain {key: tensor} dict with v4neo keys, each tensor in the folder's dtype, that train.py
--load_model, ChatRWKV and the rwkv pip package load. An export read back gives the original file's tensors
bit for bit. Before it writes, transformers' model loaded from HF_DIR and this toolkit's model run on a few
tokens in fp32 and their logits must agree (max |difference| <= 1e-4).
"""
from src import cli
from src.hf import cli as hf_cli


def main(argv=None) -> int:
    return hf_cli.run_import(argv, "import_hf.py", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    cli.exit_process(main())
