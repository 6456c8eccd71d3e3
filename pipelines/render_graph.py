"""Draw the Dagster asset graph of pipelines.definitions as a PNG (for the README).

    python -m pipelines.render_graph [--out docs/asset_graph.png]

Boxes are assets laid out by depth (longest path from a root), coloured by asset group,
with their partitions and blocking checks; arrows are dependencies. Matplotlib only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dagster import AssetKey

from cris_model.atomic import staged_file
from pipelines.defs.params import REPO_ROOT

DEFAULT_OUT = REPO_ROOT / "docs" / "asset_graph.png"
_GROUP_COLOURS = {"data": "#dbeafe", "model": "#dcfce7", "registry": "#fef3c7"}
_BOX_W, _BOX_H = 2.3, 1.1  # box size in plot units (one unit between layers is 3.0)


def graph_nodes() -> dict[str, dict]:
    """{asset: {"parents", "group", "partitions", "checks"}} from the Definitions."""
    from pipelines.definitions import defs

    graph = defs.resolve_asset_graph()
    nodes = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        partitions = node.partitions_def.get_partition_keys() if node.partitions_def else []
        nodes[key.to_user_string()] = {
            "parents": sorted(p.to_user_string() for p in node.parent_keys),
            "group": node.group_name,
            "partitions": partitions,
            "checks": sorted(c.name for c in graph.get_check_keys_for_assets({AssetKey(key.path)})),
        }
    return nodes


def _depths(nodes: dict[str, dict]) -> dict[str, int]:
    """Longest-path depth of every node from a root (roots are 0)."""
    depth: dict[str, int] = {}

    def visit(name: str) -> int:
        if name not in depth:
            depth[name] = 1 + max((visit(p) for p in nodes[name]["parents"]), default=-1)
        return depth[name]

    for name in nodes:
        visit(name)
    return depth


def _label(name: str, node: dict) -> str:
    lines = [name]
    if node["partitions"]:
        lines += ["partitioned by split:", ", ".join(node["partitions"])]
    if node["checks"]:
        lines += [f"{len(node['checks'])} blocking", "data checks"]
    return "\n".join(lines)


def render(out: Path) -> Path:
    """Write the graph PNG to `out` (through a temporary file) and return `out`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    nodes = graph_nodes()
    depth = _depths(nodes)
    layers: dict[int, list[str]] = {}
    for name in sorted(nodes, key=lambda n: (depth[n], n)):
        layers.setdefault(depth[name], []).append(name)
    pos = {name: (3.0 * d, -1.4 * i + 0.7 * (len(names) - 1))
           for d, names in layers.items() for i, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(2.2 * len(layers) + 1, 3.6), dpi=120)
    skips = 0
    for name, node in nodes.items():
        x, y = pos[name]
        for parent in node["parents"]:
            px, py = pos[parent]
            if depth[name] - depth[parent] == 1:
                start, end, style = (px + _BOX_W / 2, py), (x - _BOX_W / 2, y), "arc3"
            else:
                side = 1 if skips % 2 == 0 else -1
                skips += 1
                start, end = (px, py + side * _BOX_H / 2), (x, y + side * _BOX_H / 2)
                style = f"arc3,rad={-0.35 * side}"
            ax.annotate("", xy=end, xytext=start, zorder=1,
                        arrowprops={"arrowstyle": "-|>", "color": "#475569", "lw": 1.1,
                                    "connectionstyle": style})
        ax.add_patch(FancyBboxPatch((x - _BOX_W / 2, y - _BOX_H / 2), _BOX_W, _BOX_H,
                                    boxstyle="round,pad=0.05", ec="#334155", zorder=2,
                                    fc=_GROUP_COLOURS.get(node["group"], "#f1f5f9")))
        ax.text(x, y, _label(name, node), ha="center", va="center", fontsize=8, zorder=3)
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - _BOX_W, max(xs) + _BOX_W)
    ax.set_ylim(min(ys) - _BOX_H * 2.2, max(ys) + _BOX_H * 2.2)
    ax.set_axis_off()
    ax.set_title("CRIS asset graph (pipelines/definitions.py)", fontsize=10, pad=14)
    try:
        with staged_file(out) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return out


def main() -> None:
    """Command line: render the graph to --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write")
    print(render(parser.parse_args().out))


if __name__ == "__main__":
    main()
