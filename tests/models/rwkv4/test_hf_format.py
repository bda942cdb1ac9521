"""src/models/rwkv4/hf_format.py: v4neo names and config against transformers' own RwkvForCausalLM and RwkvConfig."""
import pytest
import torch

from src.errors import UserInputError
from src.models.rwkv4.hf_format import config_from_hf, hf_config, hf_name, missing_in_transformers, v4neo_name
from src.models.rwkv4.config import RWKVConfig
from src.models.rwkv4.model import RWKV

pytest.importorskip("transformers")  # in requirements.txt; a GPU machine staged without it skips these
from transformers import RwkvConfig, RwkvForCausalLM  # noqa: E402

CFG = RWKVConfig(vocab_size=37, n_layer=3, n_embd=16, dim_ffn=48)


def shapes(model) -> dict:
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


def test_every_name_and_shape_is_that_of_transformers():
    with torch.device("meta"):
        ours = shapes(RWKV(CFG))
        theirs = shapes(RwkvForCausalLM(RwkvConfig(**hf_config(CFG, context_length=64))))
    assert {hf_name(key): shape for key, shape in ours.items()} == theirs
    assert all(v4neo_name(hf_name(key)) == key for key in ours)


def test_config_survives_transformers_config_json():
    """Our fields -> RwkvConfig -> the dict transformers writes as config.json -> our fields."""
    written = RwkvConfig(**hf_config(CFG, context_length=64)).to_dict()
    assert written["rescale_every"] == 0 and written["tie_word_embeddings"] is False
    assert config_from_hf(written, "config.json") == CFG


@pytest.mark.parametrize("overrides, named", [
    ({"pre_ffn": 1}, "pre_ffn"), ({"head_qk": 8}, "head_qk"), ({"tiny_att_dim": 8, "tiny_att_layer": 1}, "tiny"),
    ({"my_pos_emb": 4}, "my_pos_emb"), ({"dim_att": 32}, "dim_att 32"), ({"n_layer": 1}, "n_layer 1")])
def test_each_feature_transformers_lacks_is_named(overrides, named):
    reasons = missing_in_transformers(RWKVConfig(**{**vars(CFG), **overrides}))
    assert len(reasons) == 1 and named in reasons[0], reasons


def test_a_plain_model_fits():
    assert missing_in_transformers(CFG) == []


@pytest.mark.parametrize("change, expected", [
    ({"model_type": "rwkv5"}, "'rwkv5' model"), ({"hidden_size": None}, "hidden_size is None"),
    ({"intermediate_size": -1}, "intermediate_size is -1"), ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings")])
def test_config_json_that_is_not_rwkv4_is_refused(change, expected):
    config = {**RwkvConfig(**hf_config(CFG, context_length=64)).to_dict(), **change}
    with pytest.raises(UserInputError, match=expected):
        config_from_hf(config, "config.json")
