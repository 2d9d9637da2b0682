"""The stages of a graph that the accuracy-aware search keeps in float or quantizes as one:
DenseNet's stem and dense blocks (conv1-conv5, each transition with the block before it) and
the head, with each stage's share of the compute and of the weights, and the parts of a stage
(runs of its dense layers) that the search narrows a kept stage to. One reading for TFLite and
ONNX node names, and for each member of an ensemble."""

from __future__ import annotations

import re

STAGE = re.compile(r"(conv[1-5]|pool[1-4])")
LAYER = re.compile(r"conv[2-5]_block(\d+)_")  # a dense layer of DenseNet's blocks
MEMBER = re.compile(r"member_\d+")


def stage_names(nodes: list[tuple[str, str]], pooling_ops: tuple[str, ...]) -> list[str]:
    """The stage of each (op type, name) in graph order: DenseNet's conv1-conv5 with each
    transition counted in the block before it, and 'head' from the global pooling on; other
    graphs get 'body' and 'head'. In an ensemble (`mri-edge ensemble`) each member
    (`member_N` in the names) is followed on its own, so a member's blocks stay blocks when
    they come after another member's head, and each stage holds that block of every member.
    An op without a name of its own (ONNX's `Conv__123`) belongs with the op before it."""
    out, state, member = [], {}, None
    for op_type, name in nodes:
        found = MEMBER.search(name)
        member = found.group(0) if found else member
        current, in_head = state.get(member, ("body", False))
        in_head = in_head or op_type in pooling_ops
        if not in_head:
            m = STAGE.search(name)
            if m:
                current = {"pool1": "conv1", "pool2": "conv2", "pool3": "conv3", "pool4": "conv4"}.get(m.group(1),
                                                                                                   m.group(1))
        state[member] = (current, in_head)
        out.append("head" if in_head else current)
    return out


def stages_from(nodes: list[tuple[str, str, int, int]], pooling_ops: tuple[str, ...]) -> dict[str, dict]:
    """{stage: {"nodes": [names], "node_shares", "mac_share", "param_share", "cost"}} from
    (op type, name, MACs, weights) in graph order. A stage's cost is the larger of its shares
    of the compute and of the weights: kept in float, the first costs latency, the second file
    size (conv5 of DenseNet121 at 64 px: 2% of the compute, 31% of the weights)."""
    stages: dict[str, dict] = {}
    total_macs, total_params = (sum(int(n[k]) for n in nodes) or 1 for k in (2, 3))
    for (op_type, name, macs, params), stage in zip(nodes, stage_names([n[:2] for n in nodes], pooling_ops)):
        s = stages.setdefault(stage, {"nodes": [], "node_shares": []})
        s["nodes"].append(name)
        s["node_shares"].append((int(macs) / total_macs, int(params) / total_params))
    for s in stages.values():
        add_shares(s)
    return stages


def add_shares(stage: dict) -> dict:
    stage["mac_share"], stage["param_share"] = (sum(share[i] for share in stage["node_shares"]) for i in (0, 1))
    stage["cost"] = float_cost(stage["mac_share"], stage["param_share"])
    return stage


def whole(stages: dict[str, dict]) -> list[str]:
    """The graph's stages, without the parts of them that the search adds (`part`)."""
    return [name for name in stages if "." not in name]


def dense_layers(nodes: list[str]) -> list[int | None]:
    """The dense layer of each node of a stage, in graph order. A node without one in its name
    (a transition, ONNX's `Conv__123`) goes with the layer before it in its own ensemble member;
    nodes before the first layer get None."""
    out, current, member = [], {}, None
    for node in nodes:
        found = MEMBER.search(node)
        member = found.group(0) if found else member
        layer = LAYER.search(node)
        if layer:
            current[member] = int(layer.group(1))
        out.append(current.get(member))
    return out


def part(stages: dict[str, dict], name: str) -> str:
    """A stage's dense layers first to last, named "conv2.1-3" ("conv2.2" for one layer), added
    to `stages` (with the nodes before the first layer when it starts there); returns name."""
    if name not in stages:
        stage_name, layers = name.split(".")
        first, last = (int(v) for v in layers.split("-")) if "-" in layers else (int(layers),) * 2
        stage = stages[stage_name]
        layer = dense_layers(stage["nodes"])
        lead = first == min(n for n in layer if n is not None)
        idx = [i for i, n in enumerate(layer) if (n is None and lead) or (n is not None and first <= n <= last)]
        stages[name] = add_shares({"nodes": [stage["nodes"][i] for i in idx],
                                   "node_shares": [stage["node_shares"][i] for i in idx]})
    return name


def halves(stages: dict[str, dict], name: str) -> list[str]:
    """The two halves of a stage's dense layers, in graph order (a transition goes with the
    layer before it), added to `stages` by `part`. [] for a stage of fewer than two layers."""
    stage = stages[name]
    ids = list(dict.fromkeys(n for n in dense_layers(stage["nodes"]) if n is not None)) if "node_shares" in stage else []
    if len(ids) < 2:
        return []
    base = name.split(".")[0]
    return [part(stages, f"{base}.{p[0]}" + (f"-{p[-1]}" if len(p) > 1 else ""))
            for p in (ids[:len(ids) // 2], ids[len(ids) // 2:])]


def float_cost(mac_share: float, param_share: float) -> float:
    """What keeping a part in float costs: the larger of its compute and weight shares."""
    return max(mac_share, param_share)
