"""The data types train.py and evaluate.py read (--data_type), and what each of them supports. No imports: the
command-line checks of src/config.py and the readers of src/data/dataset.py share these names.
"""
DATA_TYPES = ("utf-8", "utf-16le", "numpy", "binidx", "dummy", "uint16", "jsonl")
# accepted by the parser so that validate() can refuse it by name; not offered in --help
REFUSED_DATA_TYPES = ("wds_img",)
# data types sampled as windows of one token stream (masks and magic-prime positions apply to these)
WINDOW_DATA_TYPES = ("binidx", "numpy", "utf-8", "utf-16le", "dummy")
# data types whose ids index the characters of the text itself, not the entries of a tokenizer
CHARACTER_DATA_TYPES = ("utf-8", "utf-16le", "dummy")
