"""Cut a model in two at a named module so that ``server(client(x)) == model(x)`` exactly.

The model is traced with torch.fx, keeping residual blocks as single nodes, so the client half
is a chain of the original block objects that an attack can introspect. A cut is valid when the
named module's output is the only value that flows from the nodes before it to the nodes after.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torchvision.models.resnet as tv_resnet
from torch import nn

from leakbench.splitnn.errors import ParameterError
from leakbench.splitnn import zoo

#: Module classes traced as one node each (their internals never straddle a cut).
BLOCK_TYPES: tuple[type[nn.Module], ...] = (zoo.ResidualBlock, tv_resnet.BasicBlock, tv_resnet.Bottleneck)


class _BlockTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, BLOCK_TYPES) or super().is_leaf_module(m, qualname)


def _module_path(node: fx.Node) -> list[str]:
    """Qualified names of the modules a node was traced inside, outermost first."""
    stack = list(node.meta.get("nn_module_stack", {}).keys())
    if node.op == "call_module" and node.target not in stack:
        stack.append(str(node.target))
    return stack


def valid_cuts(model: nn.Module) -> list[str]:
    """Names of the modules after which ``model`` can be cut, in forward order."""
    graph = _BlockTracer().trace(model)
    nodes = list(graph.nodes)
    cuts = []
    for name in _candidate_names(nodes):
        try:
            _cut_index(nodes, name)
        except ParameterError:
            continue
        cuts.append(name)
    return cuts


def _candidate_names(nodes: list[fx.Node]) -> list[str]:
    seen: dict[str, None] = {}
    for node in nodes:
        for name in _module_path(node):
            seen.setdefault(name, None)
    return list(seen)


def _cut_index(nodes: list[fx.Node], cut: str) -> int:
    """Index of the node whose output is the cut; raises ParameterError if the cut is not clean."""
    inside = [i for i, n in enumerate(nodes) if cut in _module_path(n)]
    if not inside:
        raise ParameterError("cut", cut, "the name of a module the model runs (e.g. 'layer1' or 'layer2.1')")
    index = inside[-1]
    before = set(nodes[: index + 1])
    crossing = {a for n in nodes[index + 1:] for a in n.all_input_nodes if a in before}
    if crossing != {nodes[index]}:
        raise ParameterError("cut", cut, "a module after which a single tensor flows on "
                                         "(a skip connection crosses this point)")
    if nodes[index].op in ("placeholder", "output"):
        raise ParameterError("cut", cut, "a module inside the model")
    return index


def split(model: nn.Module, cut: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Return ``(client, server)``: the model up to and including module ``cut``, and the rest.

    Both halves share parameters with ``model``. Raises ParameterError naming the valid cuts
    when ``cut`` is not one.
    """
    graph = _BlockTracer().trace(model)
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ParameterError("model", type(model).__name__, "a model with exactly one input")
    try:
        index = _cut_index(nodes, cut)
    except ParameterError as exc:
        raise ParameterError("cut", cut, exc.expected + "; valid cuts: " + ", ".join(valid_cuts(model))) from None

    client_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes[: index + 1]:
        env[node] = client_graph.node_copy(node, lambda a: env[a])
    client_graph.output(env[nodes[index]])

    server_graph = fx.Graph()
    env = {nodes[index]: server_graph.placeholder("features")}
    for node in nodes[index + 1:]:
        env[node] = server_graph.node_copy(node, lambda a: env[a])

    client = fx.GraphModule(model, client_graph, class_name="Client")
    server = fx.GraphModule(model, server_graph, class_name="Server")
    client.train(model.training)
    server.train(model.training)
    return client, server


def client_modules(client: fx.GraphModule) -> list[tuple[str, nn.Module | None, fx.Node]]:
    """The client half as a chain: ``(name, module or None, node)`` for every computing node, in order."""
    chain = []
    for node in client.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        module = client.get_submodule(str(node.target)) if node.op == "call_module" else None
        chain.append((str(node.target) if node.op == "call_module" else node.name, module, node))
    return chain


@torch.no_grad()
def max_split_error(model: nn.Module, client: nn.Module, server: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute difference between ``server(client(x))`` and ``model(x)`` (0.0 when exact)."""
    return (server(client(x)) - model(x)).abs().max().item()
