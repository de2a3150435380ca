"""Folding models that no capture takes whole (branches on tensor values), one module at a time.

Each submodule that traces on its own is folded as a graph and replaced by its folded GraphModule: its
inputs and outputs are unchanged, so the rest of the model cannot tell. A module whose own forward does
not trace still folds the conv -> BN pairs its source code wires directly (`self.bn(self.conv(x))`), when
that is provable from the code alone: each attribute is used once in the class, the conv and BN are
stock torch modules used nowhere else, and the BN class itself insists on the conv's batched rank.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

from torch import nn

from bnfold import foldmath
from bnfold.health import fold_refusal
from bnfold.layers import FoldDecision, FoldDirection, FoldStatus
from bnfold.pytorch.capture import private_copy, trace_functional
from bnfold.pytorch.discover import bn_kind
from bnfold.pytorch.fold import GraphFolder, assign_rounded

# BN classes that reject any other input rank, with the conv classes whose batched output has that rank.
_RANK_CHECKED_PAIRS = {
    nn.BatchNorm2d: (nn.Conv2d, nn.ConvTranspose2d),
    nn.BatchNorm3d: (nn.Conv3d, nn.ConvTranspose3d),
}


def fold_by_module(model: nn.Module, why: str) -> tuple[nn.Module, dict[str, FoldDecision]]:
    """A folded copy of `model` and the decisions, for a model that does not capture as a whole."""
    root = private_copy(model)
    decisions: dict[str, FoldDecision] = {}
    _visit(root, "", root, decisions, why)
    return root, decisions


def _visit(module: nn.Module, path: str, root: nn.Module, decisions: dict[str, FoldDecision], why: str) -> None:
    for conv_name, bn_name in _direct_pairs(module, root):
        conv, bn = getattr(module, conv_name), getattr(module, bn_name)
        scale, shift = foldmath.bn_affine(*(_float64(t) for t in (bn.weight, bn.bias, bn.running_mean,
                                                                    bn.running_var)), bn.eps)
        refusal = fold_refusal(scale, shift, _float64(bn.running_var))
        if refusal:
            decisions[_join(path, bn_name)] = FoldDecision(_join(path, bn_name), FoldStatus.KEPT, reason=refusal)
            continue
        weight, bias = _float64(conv.weight), _float64(conv.bias)
        if isinstance(conv, nn.modules.conv._ConvTransposeNd):
            weight, bias = foldmath.fold_into_conv_transpose(weight, bias, scale, shift, conv.groups)
        else:
            weight, bias = foldmath.fold_into_producer(weight, bias, scale, shift)
        assign_rounded(conv, "weight", weight, conv.weight)
        assign_rounded(conv, "bias", bias, conv.weight)
        setattr(module, bn_name, nn.Identity())
        decisions[_join(path, bn_name)] = FoldDecision(_join(path, bn_name), FoldStatus.FOLDABLE,
                                                       [_join(path, conv_name)], FoldDirection.INTO_PRODUCER)
    for name, child in list(module.named_children()):
        child_path = _join(path, name)
        if child_path in decisions or not any(bn_kind(m) for m in child.modules()):
            continue
        try:
            traced = trace_functional(child)
        except Exception:  # this child's own code does not trace either: go one level deeper
            if bn_kind(child) is not None:
                decisions[child_path] = _kept(child_path, why)
            _visit(child, child_path, root, decisions, why)
            continue
        if bn_kind(child) is not None:  # a lone BN module: its producer lives in the owner's code
            refusals = [o.refusal for o in GraphFolder(traced, child_path).occurrences().get(child_path, [])]
            decisions[child_path] = next((FoldDecision(child_path, FoldStatus.KEPT, reason=r) for r in refusals if r),
                                         _kept(child_path, why))
            continue
        folder = GraphFolder(traced, child_path)
        found = folder.fold_all()
        if any(d.status is FoldStatus.FOLDABLE for d in found.values()):
            setattr(module, name, folder.folded())
        decisions.update(found)


def _kept(layer: str, why: str) -> FoldDecision:
    return FoldDecision(layer, FoldStatus.KEPT, reason=f"{why}, and the code around it does not provably feed "
                                                       "it a conv output that nothing else reads")


# Ways to reach a child module without naming it as `self.<name>`: with them, one use cannot be proven.
_INDIRECT = {"getattr", "children", "named_children", "modules", "named_modules", "_modules", "__dict__", "vars",
             "apply"}


def _direct_pairs(module: nn.Module, root: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) child names that `module`'s forward provably wires as bn(conv(...)) and nowhere else."""
    tree = _syntax(type(module))
    if tree is None:
        return []
    uses: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and _is_self(node.value):
            uses[node.attr] = uses.get(node.attr, 0) + 1
    outside = _reached_from_outside(root)
    pairs = []
    for node in ast.walk(tree):
        inner = node.args[0] if isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords else None
        bn_name, conv_name = _self_call(node), _self_call(inner)
        if bn_name and conv_name and uses.get(bn_name) == 1 and uses.get(conv_name) == 1 \
                and not {bn_name, conv_name} & outside and _foldable_pair(module, conv_name, bn_name, root):
            pairs.append((conv_name, bn_name))
    return pairs


def _syntax(cls: type) -> ast.AST | None:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return None


def _reached_from_outside(root: nn.Module) -> set[str]:
    """Attribute names that some model class reads on objects other than `self` (all child names when a
    class has no source or reaches modules indirectly): such children may be called from elsewhere."""
    everything = {name.rpartition(".")[2] for name, _ in root.named_modules()}
    names: set[str] = set()
    for cls in {type(m) for m in root.modules() if not type(m).__module__.startswith("torch.")}:
        tree = _syntax(cls)
        if tree is None:
            return everything
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and not _is_self(node.value):
                names.add(node.attr)
            if (getattr(node, "id", None) or getattr(node, "attr", None)) in _INDIRECT:
                return everything
    return names


def _is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def _self_call(node: ast.AST | None) -> str | None:
    """`name` for a call `self.name(...)`."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _is_self(node.func.value):
        return node.func.attr
    return None


def _foldable_pair(module: nn.Module, conv_name: str, bn_name: str, root: nn.Module) -> bool:
    conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
    if type(bn) not in _RANK_CHECKED_PAIRS or type(conv) not in _RANK_CHECKED_PAIRS[type(bn)]:
        return False
    if bn.training or bn.running_mean is None:
        return False
    everywhere = [m for _, m in root.named_modules(remove_duplicate=False)]
    shared_weight = sum(p is conv.weight for _, p in root.named_parameters(remove_duplicate=False)) > 1
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in (conv, bn))
    return (bn.num_features == conv.out_channels and everywhere.count(conv) == 1 and everywhere.count(bn) == 1
            and not shared_weight and not hooked)


def _float64(tensor):
    return None if tensor is None else tensor.detach().to("cpu").double().numpy()


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
