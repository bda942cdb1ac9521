"""The model families the toolkit trains, and how a run finds its family: from --my_testing for a run from scratch,
from the keys of the file for --load_model. A family is a folder, src/models/<name>/, with a ModelFamily record
(src/models/family.py) registered here in one line. No torch import.
"""
from src.errors import UserInputError
from src.models.family import EMBEDDING, HEAD, ModelFamily  # noqa: F401 (the names every caller needs, in one place)
from src.models.rwkv4.family import RWKV4
from src.models.rwkv7.family import RWKV7

FAMILIES: dict = {}  # name -> ModelFamily, the first one registered being the default


def register(family: ModelFamily) -> ModelFamily:
    if family.name in FAMILIES or any(f.my_testing == family.my_testing for f in FAMILIES.values()):
        raise ValueError(f"a model family named {family.name!r} or picked by --my_testing {family.my_testing!r} is "
                         f"already registered")
    FAMILIES[family.name] = family
    return family


register(RWKV4)
register(RWKV7)


def flag_groups() -> tuple:
    """The flag groups (dataclasses) of the registered families, which train.py's TrainConfig inherits."""
    return tuple(family.flag_group for family in FAMILIES.values() if family.flag_group is not None)


def default_family() -> ModelFamily:
    return next(iter(FAMILIES.values()))


def family_named(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise UserInputError(f"{name!r} is not a model family this toolkit knows ({', '.join(FAMILIES)}).")
    return FAMILIES[name]


def family_of_model(model) -> ModelFamily:
    """The family of a model that `build` made (its class names its record)."""
    return FAMILIES[model.family_name]


def family_of_flags(my_testing: str) -> ModelFamily:
    """The family --my_testing picks ("" for the default); other values name the original's architecture variants,
    which this toolkit does not carry."""
    for family in FAMILIES.values():
        if family.my_testing == my_testing:
            return family
    known = ", ".join(f"{f.my_testing!r} ({f.title})" for f in FAMILIES.values())
    raise UserInputError(f"--my_testing {my_testing} is not supported: the original used it for architecture "
                         f"variants ('a', 'g') that this toolkit does not carry; the families it trains are {known}.")


def family_of_hf_config(config: dict, path) -> ModelFamily:
    """The family whose transformers model_type a config.json names. Where none has it, the default family's
    format says what is wrong."""
    for family in FAMILIES.values():
        hf_format = family.hf_format()
        if hf_format is not None and config.get("model_type") == hf_format.MODEL_TYPE:
            return family
    default_family().hf_format().config_from_hf(config, path)  # raises its own reason
    raise UserInputError(f"{path}: model_type {config.get('model_type')!r} is not one this toolkit imports.")


def family_of_weights(weights: dict, path: str = "base") -> ModelFamily:
    """The one family whose keys `weights` has. Where none has them, the default family says what is missing."""
    found = [family for family in FAMILIES.values() if family.detect(weights)]
    if len(found) == 1:
        return found[0]
    if found:
        raise UserInputError(f"{path} has the keys of several model families ({', '.join(f.title for f in found)}); "
                             f"it is not a model this toolkit can read.")
    default_family().shape_of_weights(weights, path)  # raises its own reason
    raise UserInputError(f"{path} is not a model of a family this toolkit knows "
                         f"({', '.join(f.title for f in FAMILIES.values())}).")


def read_model_weights(weights: dict, path: str = "base") -> tuple:
    """(the family of a model's state dict, the state dict in that family's layout: ModelFamily.canonical_weights)."""
    family = family_of_weights(weights, path)
    return family, family.canonical_weights(weights)
