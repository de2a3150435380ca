"""`private_copy` against `copy.deepcopy`: the same copy, made faster, on the patterns real modules use."""

import copy

import pytest
import torch
from torch import nn

from bnfold.pytorch.capture import private_copy
from tests.zoo import mobilenetv2_timm, resnet_bottleneck


class Tied(nn.Module):
    """Shared weights, a shared submodule, a submodule in a plain list, a buffer viewing another's
    storage, attributes on a parameter, a frozen parameter and a parameter with a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(6, 6)
        self.decode = nn.Linear(6, 6)
        self.decode.weight = self.encode.weight
        self.norm = nn.BatchNorm1d(6)
        self.again = self.norm
        self.plain_list = [self.decode]
        self.register_buffer("table", torch.arange(12.0))
        self.register_buffer("half_table", self.table[:6])
        self.scale = nn.Parameter(torch.ones(6), requires_grad=False)
        self.shift = nn.Parameter(torch.zeros(6))
        self.shift.grad = torch.full((6,), 0.5)
        self.encode.bias.tag = "tagged"
        self.note = {"kind": "tied", "sizes": (6, 6)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.again(self.decode(self.encode(x))) * self.scale + self.shift + self.half_table


def hooked() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model[1].register_forward_hook(lambda module, args, output: output * 2)
    return model


def parametrized() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    torch.nn.utils.parametrizations.spectral_norm(model[2])
    return model


CASES = {"zoo resnet": (resnet_bottleneck, (2, 3, 32, 32)), "zoo mobilenet": (mobilenetv2_timm, (2, 3, 32, 32)),
         "tied": (Tied, (4, 6)), "hooked": (hooked, (2, 3, 8, 8)), "parametrized": (parametrized, (2, 3, 8, 8)),
         "scripted": (lambda: torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))), (2, 3, 8, 8))}


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers(remove_duplicate=False))}


def identities(module: nn.Module) -> list[tuple[str, ...]]:
    """Which named modules and tensors are one object (in order of first appearance)."""
    named = [*module.named_modules(remove_duplicate=False), *tensors(module).items()]
    groups: dict[int, list[str]] = {}
    for name, value in named:
        groups.setdefault(id(value), []).append(name)
    return sorted(tuple(names) for names in groups.values())


@pytest.mark.parametrize("case", CASES)
def test_private_copy_is_the_copy_deepcopy_makes(case):
    factory, shape = CASES[case]
    torch.manual_seed(0)
    original = factory().eval()
    expected, copied = copy.deepcopy(original), private_copy(original)
    assert type(copied) is type(original) and identities(copied) == identities(original) == identities(expected)
    ours, theirs, mine = tensors(copied), tensors(expected), tensors(original)
    assert list(ours) == list(theirs)
    for name, tensor in ours.items():
        assert type(tensor) is type(theirs[name]) and tensor.requires_grad == theirs[name].requires_grad, name
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=0)
        assert tensor.untyped_storage().data_ptr() != mine[name].untyped_storage().data_ptr(), name
        assert vars(tensor) == vars(theirs[name]), name
        if theirs[name].is_leaf and theirs[name].grad is not None:
            torch.testing.assert_close(tensor.grad, theirs[name].grad, rtol=0, atol=0)
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(copied(x), expected(x), rtol=0, atol=0)
        for tensor in ours.values():
            tensor.add_(1)  # the copy is the copy's: the original does not move
        torch.testing.assert_close(original(x), expected(x), rtol=0, atol=0)


def test_a_copy_keeps_what_the_original_shares_with_itself():
    original = Tied()
    copied = private_copy(original)
    assert copied.decode.weight is copied.encode.weight and copied.again is copied.norm
    assert copied.plain_list[0] is copied.decode
    assert copied.half_table.untyped_storage().data_ptr() == copied.table.untyped_storage().data_ptr()
    assert copied.note == original.note and copied.note is not original.note


def test_shared_tensors_stay_the_originals():
    original = resnet_bottleneck().eval()
    copied = private_copy(original, share_tensors=True)
    assert all(a is b for a, b in zip(tensors(copied).values(), tensors(original).values()))
    assert copied is not original and all(a is not b for a, b in zip(copied.modules(), original.modules()))
