#!/usr/bin/env bash
# Tokenize JSONL into binidx for train.py: the ChatGal fork's preprocess_data.sh, with its values as defaults.
#   INPUT=my.jsonl OUTPUT_PREFIX=./data/mine ./preprocess_data.sh            -> ./data/mine_text_document.bin/.idx
#   VOCAB=rwkv_vocab_v20230424.txt TOKENIZER_TYPE=RWKVTokenizer ./preprocess_data.sh   (World models)
#   ./preprocess_data.sh --workers 8                                          (extra flags pass through)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python}
INPUT=${INPUT:-datasource/train_dataset_augmented_only.jsonl}
OUTPUT_PREFIX=${OUTPUT_PREFIX:-./data/chatgal}
VOCAB=${VOCAB:-20B_tokenizer.json}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-HFTokenizer}
SPECIAL_TOKENS=${SPECIAL_TOKENS:-}  # RWKVTokenizer only, e.g. st_dict.json

"$PYTHON" preprocess_data.py --input "$INPUT" --output-prefix "$OUTPUT_PREFIX" --vocab "$VOCAB" \
    --dataset-impl mmap --tokenizer-type "$TOKENIZER_TYPE" --append-eod \
    ${SPECIAL_TOKENS:+--special_tokens_dict_path "$SPECIAL_TOKENS"} "$@"
