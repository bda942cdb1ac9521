"""The family registry is the seam for a second model family: a toy family registered here in a few lines trains
through train.py (plain and --state_cp), its blocks pass a carry (as RWKV-7's v_first), --state_cp's gradients
equal plain backpropagation's, and its checkpoint is recognised by its keys."""
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch
import torch.nn as nn

import train
from src import models
from src.io.checkpoint import load_weights
from src.loss import head_loss, head_token_losses
from src.models import EMBEDDING, HEAD, ModelFamily
from src.train.state_cp import engine


@dataclass
class ToyShape:
    vocab_size: int
    n_layer: int
    n_embd: int


class ToyState(NamedTuple):
    h: torch.Tensor  # (n_layer, B, C): each block's decayed running sum

    def layer(self, i):
        return (self.h[i],)


class ToyModel(nn.Module):
    """x_t <- x_t + out(h_t + v), h_t = decay * h_t-1 + x_t per block; block 0 makes v (the carry), later blocks
    read it."""
    family_name = "toy"

    def __init__(self, cfg: ToyShape, options=None):
        super().__init__()
        self.cfg, C = cfg, cfg.n_embd
        self.toy_emb = nn.Embedding(cfg.vocab_size, C)
        self.blocks = nn.ModuleList(nn.ModuleDict({"mix": nn.Linear(C, C, bias=False)}) for _ in range(cfg.n_layer))
        self.blocks[0]["make_v"] = nn.Linear(C, C)  # the carry's maker
        self.ln_out, self.head = nn.LayerNorm(C), nn.Linear(C, cfg.vocab_size, bias=False)
        self.n_blocks = cfg.n_layer

    def embed(self, idx):
        return self.toy_emb(idx)

    def first_carry(self, x):
        return ()

    def run_block(self, i, x, carry, layer_state):
        h = torch.zeros_like(x[:, 0]) if layer_state is None else layer_state[0]
        sums = []
        for t in range(x.shape[1]):
            h = 0.8 * h + x[:, t]
            sums.append(h)
        carry = (torch.tanh(self.blocks[i]["make_v"](x)),) if i == 0 else carry
        return x + self.blocks[i]["mix"](torch.stack(sums, 1) + carry[0]), carry, (h,)

    def state_of_layers(self, layers):
        return ToyState(torch.stack([h for (h,) in layers]))

    def run_blocks(self, x, state=None):
        carry, layers = self.first_carry(x), []
        for i in range(self.n_blocks):
            x, carry, layer_state = self.run_block(i, x, carry, None if state is None else state.layer(i))
            layers.append(layer_state)
        return x, self.state_of_layers(layers)

    def head_loss(self, x, targets, idx=None, targets_in_sample=None, positions_in_sample=None):
        return head_loss(self.ln_out(x), self.head.weight, targets, targets_in_sample, positions_in_sample)

    def token_losses(self, x, targets, idx=None):
        return head_token_losses(self.ln_out(x), self.head.weight, targets)

    def forward(self, idx, state=None):
        x, state = self.run_blocks(self.embed(idx), state)
        return self.head(self.ln_out(x)), state

    def loss(self, idx, targets):
        return self.head_loss(self.run_blocks(self.embed(idx))[0], targets)


class ToyFamily(ModelFamily):
    name, title, my_testing = "toy", "Toy", "toy"

    def shape_from_flags(self, flags, vocab_size):
        return ToyShape(vocab_size, flags.n_layer, flags.n_embd)

    def forward_options(self, flags):
        return None

    def reference_options(self):
        return None

    def detect(self, weights):
        return "toy_emb.weight" in weights

    def shape_of_weights(self, weights, path="base"):
        vocab_size, n_embd = weights["toy_emb.weight"].shape
        return ToyShape(vocab_size, len({key.split(".")[1] for key in weights if key.startswith("blocks.")}), n_embd)

    def build(self, shape, options=None):
        return ToyModel(shape)

    def init_weights(self, model, lr_init, device=None, dtype=None):
        return {k: v.detach().to(dtype or torch.float32, copy=True) for k, v in model.state_dict().items()}

    def piece_of(self, name):
        if name.startswith("toy_emb."):
            return EMBEDDING
        return int(name.split(".")[1]) if name.startswith("blocks.") else HEAD

    def activation_bytes(self, shape, batch, tokens, dtype_bytes, checkpointed, inputs_on_device=True,
                         wkv_kernel=True):
        return 4 * shape.n_layer * batch * tokens * shape.n_embd * dtype_bytes


@pytest.fixture
def toy_family():
    family = models.register(ToyFamily())
    yield family
    del models.FAMILIES[family.name]


RUN = ["--data_type", "dummy", "--n_layer", "2", "--n_embd", "16", "--ctx_len", "24", "--micro_bsz", "2",
       "--epoch_steps", "6", "--epoch_count", "2", "--epoch_save", "0", "--lr_init", "3e-3", "--lr_final", "1e-3",
       "--random_seed", "1", "--enable_progress_bar", "0", "--layerwise_lr", "0"]


@pytest.mark.parametrize("segments", [[], ["--state_cp", "1", "--ctx_parts", "3"]], ids=["plain", "state_cp"])
def test_a_registered_family_trains_through_train_py(toy_family, tmp_path, capsys, segments):
    assert train.main([*RUN, *segments, "--my_testing", "toy", "--proj_dir", str(tmp_path / "out")]) == 0
    weights = load_weights(tmp_path / "out" / "rwkv-final.pth")
    assert set(weights) == set(ToyModel(ToyShape(1, 2, 16)).state_dict())  # the toy's keys, nothing of RWKV-4
    losses = [float(line.split("loss ")[1].split()[0].rstrip(",")) for line in capsys.readouterr().out.splitlines()
              if line.startswith("mini-epoch") and "loss " in line]
    assert len(losses) == 2 and losses[1] < losses[0]


def test_a_checkpoint_is_read_by_its_family(toy_family, tmp_path):
    assert train.main([*RUN, "--my_testing", "toy", "--proj_dir", str(tmp_path / "first")]) == 0
    final = tmp_path / "first" / "rwkv-final.pth"
    assert models.family_of_weights(load_weights(final)) is toy_family
    # --load_model without --my_testing: the file says which family trains
    assert train.main([*RUN, "--load_model", str(final), "--proj_dir", str(tmp_path / "second")]) == 0
    assert set(load_weights(tmp_path / "second" / "rwkv-final.pth")) == set(load_weights(final))


def test_state_cp_carries_the_state_and_the_carry_exactly(toy_family):
    """Uneven segments in fp64: the segment engine's gradients (through the layer state and the carry of every
    block) equal plain backpropagation's."""
    torch.manual_seed(0)
    model = toy_family.build(ToyShape(11, 3, 8)).double()
    idx, targets = torch.randint(0, 11, (2, 17)), torch.randint(0, 11, (2, 17))
    plain = model.loss(idx, targets)
    expected = torch.autograd.grad(plain, list(model.parameters()))
    segmented = engine.sample_loss(model, idx, targets, segment_len=5)
    got = torch.autograd.grad(segmented, list(model.parameters()))
    assert torch.allclose(segmented, plain, rtol=1e-12)
    for name, g, e in zip([n for n, _ in model.named_parameters()], got, expected):
        assert (g - e).norm() <= 1e-10 * e.norm(), name
