"""Residual blocks recognised by structure in the client's traced graph (torch.fx), not by class name.

A block is any subgraph that forks a value ``x`` into two chains that meet again at an addition,
``[relu](branch(x) + shortcut(x))``, whether written with modules or with functional ops (``F.relu``,
``torch.relu``, ``x.relu()``, ``+``, ``torch.add``). So a user's own block class, traced through by
``splitnn.split``, is found the same way as ours. The chains are returned as ``(name, module, node)`` items;
``stages`` decides whether it can invert what they hold.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import fx, nn

from leakbench.splitnn.split import BLOCK_TYPES

Item = tuple[str, Union[nn.Module, None], fx.Node]


class GraphError(ValueError):
    """The graph holds a fork PEEL cannot read as a residual block (the message names the node)."""


@dataclass
class GraphBlock:
    """A residual block found by structure: ``[post_relu](branch(x) + shortcut(x))``; empty ``shortcut`` is
    the identity."""

    name: str
    branch: list[Item]
    shortcut: list[Item]
    post_relu: Item | None


@dataclass
class LeafBlock:
    """A block the tracer kept as one module (one of ``splitnn.split.BLOCK_TYPES``)."""

    name: str
    module: nn.Module


Segment = Union[list[Item], GraphBlock, LeafBlock]


def is_relu(node: fx.Node, module: nn.Module | None) -> bool:
    """A ReLU as a module, a function (``F.relu``, ``torch.relu``) or a method (``x.relu()``)."""
    return (isinstance(module, nn.ReLU) or (node.op == "call_function" and node.target in (F.relu, torch.relu))
            or (node.op == "call_method" and node.target == "relu"))


def is_add(node: fx.Node) -> bool:
    """``a + b`` or ``torch.add(a, b)`` / ``a.add(b)`` of two values, without a scaling ``alpha``."""
    adds = (node.op == "call_function" and node.target in (operator.add, torch.add)) or \
        (node.op == "call_method" and node.target == "add")
    return adds and "alpha" not in node.kwargs and len(node.all_input_nodes) == 2


def _item(client: fx.GraphModule, node: fx.Node) -> Item:
    if node.op == "call_module":
        return str(node.target), client.get_submodule(str(node.target)), node
    return node.name, None, node


def _chain(start: fx.Node, source: fx.Node) -> tuple[list[fx.Node], fx.Node]:
    """The nodes from ``start`` (a user of ``source``) up to the addition that ends the chain, and that
    addition; each node on the way must take only the previous one and feed only the next."""
    chain, node, previous = [], start, source
    while not is_add(node):
        if node.all_input_nodes != [previous]:
            raise GraphError(f"unsupported op {op_name(node)} at node {node.name}: inside a residual block each op "
                             "must take only the previous value")
        if len(node.users) != 1:
            raise GraphError(f"unsupported op {op_name(node)} at node {node.name}: its value is used "
                             f"{len(node.users)} times inside a residual block")
        chain.append(node)
        previous, node = node, next(iter(node.users))
    return chain, node


def _name(client: fx.GraphModule, nodes: list[fx.Node], add: fx.Node) -> str:
    """The block's name: the longest module path its layers share (e.g. ``layer1.0``), else the addition's."""
    paths = [str(n.target).split(".") for n in nodes if n.op == "call_module"]
    common: list[str] = []
    for parts in zip(*paths) if paths else ():
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if paths and len(common) == min(len(p) for p in paths):
        common = common[:-1]  # a single layer's own path is not the block's
    return ".".join(common) or add.name


def _block(client: fx.GraphModule, source: fx.Node) -> tuple[GraphBlock, fx.Node]:
    """The block forking at ``source`` and its last node (the addition, or the ReLU after it)."""
    users = list(source.users)
    if len(users) != 2:
        raise GraphError(f"unsupported op at node {source.name}: its value is used {len(users)} times; PEEL reads "
                         "a fork as a residual block only when it has two branches that are added")
    chains = [_chain(u, source) if not is_add(u) else ([], u) for u in users]
    (first, add), (second, other) = chains
    if add is not other:
        raise GraphError(f"unsupported op at node {source.name}: its two uses end at different nodes "
                         f"({add.name}, {other.name}), not at one addition")
    shortcut, branch = sorted((first, second), key=len)  # the shortcut is the shorter chain (often empty)
    end, post = add, None
    if len(add.users) == 1:
        after = next(iter(add.users))
        if is_relu(after, client.get_submodule(str(after.target)) if after.op == "call_module" else None):
            end, post = after, _item(client, after)
    block = GraphBlock(_name(client, branch + shortcut, add), [_item(client, n) for n in branch],
                       [_item(client, n) for n in shortcut], post)
    return block, end


def segments(client: fx.GraphModule) -> list[Segment]:
    """The client as a sequence of layer runs, blocks found by structure and blocks kept as modules."""
    nodes = list(client.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    found: list[Segment] = []
    pending: list[Item] = []
    i = 0

    def forks(node: fx.Node) -> bool:
        return len(node.users) > 1

    def take_block(source: fx.Node) -> int:
        if pending:
            found.append(list(pending))
            pending.clear()
        block, end = _block(client, source)
        inside = {item[2] for item in block.branch + block.shortcut}
        between = nodes[order[source] + 1:order[end] + 1]
        strays = [n for n in between if n not in inside and not is_add(n) and n is not end]
        if strays:
            raise GraphError(f"unsupported op {op_name(strays[0])} at node {strays[0].name}: it runs inside the "
                             f"residual block {block.name} but on neither of its branches")
        found.append(block)
        return order[end]

    while i < len(nodes):
        node = nodes[i]
        if node.op == "output":
            break
        if node.op == "placeholder":
            i = take_block(node) + 1 if forks(node) else i + 1
            continue
        module = client.get_submodule(str(node.target)) if node.op == "call_module" else None
        if isinstance(module, BLOCK_TYPES):
            if pending:
                found.append(list(pending))
                pending.clear()
            found.append(LeafBlock(str(node.target), module))
        elif is_add(node):
            raise GraphError(f"unsupported op {op_name(node)} at node {node.name}: an addition outside a residual "
                             "block")
        else:
            pending.append(_item(client, node))
        last = i
        while forks(nodes[last]):  # a block follows; so may another, right after it
            last = take_block(nodes[last])
        i = last + 1
    if pending:
        found.append(list(pending))
    return found


def op_name(node: fx.Node, module: nn.Module | None = None) -> str:
    """An op as the error messages name it: the module's class, or the function's or method's name."""
    target: Any = node.target
    return type(module).__name__ if module is not None else getattr(target, "__name__", str(target))
