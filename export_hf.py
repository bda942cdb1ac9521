"""Export an RWKV-4 .pth to a Hugging Face transformers folder (RwkvForCausalLM), checked logit for logit.

    python export_hf.py MODEL.pth OUT_DIR [--vocab 20B_tokenizer.json] [--dtype fp32|bf16|fp16] [--ctx_len N]
                        [--overwrite]

OUT_DIR gets config.json (read from the weights: any layer count, width, vocabulary), safetensors weights and,
with --vocab, the tokenizer files; `RwkvForCausalLM.from_pretrained(OUT_DIR)` and AutoTokenizer load it.
Before it reports success, transformers' model loaded from the written folder and this toolkit's model run
on a few tokens in fp32 and their logits must agree (max |difference| <= 1e-4). Models with parts that
transformers' RWKV lacks (pre_ffn, head_qk, tiny attention, my_pos_emb, dim_att != n_embd) and LoRA files
are refused in one line.
"""
from src import cli
from src.hf import cli as hf_cli


def main(argv=None) -> int:
    return hf_cli.run_export(argv, "export_hf.py", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    cli.exit_process(main())
