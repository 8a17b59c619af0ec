"""The layer map: one cell per model block, coloured by the node that holds it, and a legend
of each node's range, size and whether it matches the plan."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from core.planning.layer_map import COORDINATOR, LOADED, PLAN, SWARM, LayerMap
from core.supervision.bottleneck import Bottleneck
from tui.text import sanitize

# Distinct on dark and light themes; red stays for errors, grey for the coordinator's CPU.
PALETTE = ("dodger_blue2", "dark_orange", "medium_purple2", "spring_green3", "gold3",
           "deep_pink3", "turquoise2", "tan", "slate_blue1", "chartreuse3", "hot_pink",
           "light_sea_green")
COORDINATOR_COLOUR = "grey62"
UNSERVED_COLOUR = "bold red"
CELL, EMPTY, UNSERVED, COLD = "█", "░", "✗", "▒"
SOURCE_LABEL = {PLAN: "planned, nothing loaded yet", LOADED: "as loaded by llama-server",
                SWARM: "as served in the swarm (DHT)"}


def _blocks(blocks: set[int]) -> str:
    shown = ", ".join(str(b) for b in sorted(blocks)[:12])
    more = "" if len(blocks) <= 12 else f" and {len(blocks) - 12} more"
    return f"block{'s' if len(blocks) > 1 else ''} {shown}{more}"


def _size(count: int) -> str:
    if count <= 0:
        return ""
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


class LayerMapView(Static):
    """Shows a LayerMap; `node_order` fixes each node's colour (config order), so a node keeps
    its colour when others come and go."""

    def __init__(self, node_order: list[str], *, id: str | None = None) -> None:  # noqa: A002
        super().__init__("no model placed yet: press p for the plan, u to bring the cluster up",
                         id=id)
        self._colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(node_order)}
        self._colours[COORDINATOR] = COORDINATOR_COLOUR
        self.map: LayerMap | None = None
        self.bottleneck: Bottleneck | None = None

    def on_mount(self) -> None:
        self.border_title = "layers"

    def colour(self, node: str) -> str:
        return self._colours.get(node, "white")

    def show_bottleneck(self, found: Bottleneck | None) -> None:
        """Mark the slowest node in the legend (where each token's time goes)."""
        if found == self.bottleneck:
            return
        self.bottleneck = found
        if self.map is not None and self.map.blocks:
            self.update(self.render_map(self.map))

    def show_map(self, layer_map: LayerMap | None) -> None:
        if layer_map == self.map:
            return
        self.map = layer_map
        if layer_map is None or not layer_map.blocks:
            self.update("no model placed yet: press p for the plan, u to bring the cluster up")
            return
        self.update(self.render_map(layer_map))

    def render_map(self, layer_map: LayerMap) -> Text:
        text = Text(no_wrap=False)
        text.append(f"{layer_map.blocks} blocks, {SOURCE_LABEL.get(layer_map.source, '')}\n",
                    style="dim")
        unserved = set(layer_map.unserved)
        cold = set(layer_map.cold)
        owners = [layer_map.owner(b) for b in range(layer_map.blocks)]
        for block, owner in enumerate(owners):
            if block in unserved:
                text.append(UNSERVED, style=UNSERVED_COLOUR)
            elif owner is None:
                text.append(EMPTY, style="dim")
            elif block in cold:  # its weights are not in the node's cache: a load sends them
                text.append(COLD, style=self.colour(owner))
            else:
                text.append(CELL, style=self.colour(owner))
            if block % 10 == 9 and block + 1 < layer_map.blocks:
                text.append(" ")  # a gap every ten blocks: counting without a ruler
        labels = ["coordinator (CPU)" if span.node == COORDINATOR else sanitize(span.node)
                  for span in layer_map.spans]
        width = min(24, max((len(label) for label in labels), default=0))
        for span, label in zip(layer_map.spans, labels, strict=True):
            text.append("\n")
            text.append(f"{CELL} ", style=self.colour(span.node))
            text.append(f"{label:<{width}.{width}}", style="bold")
            rng = f"{span.first}-{span.last}" if span.count > 1 else f"{span.first}"
            text.append(f" {rng:>7} {span.count:>3} blk")
            size = _size(span.model_bytes)
            if size and layer_map.source == SWARM:  # Petals: the plan's memory, then the real
                text.append(f" {size:>9} predicted")
                measured = _size(span.measured_bytes)
                if measured:
                    text.append(f", {measured} PSS")
            elif size:
                text.append(f" {size:>9}")
            if span.state:
                text.append(f" {span.state}", style=UNSERVED_COLOUR)
            if span.mismatch:
                text.append(f" ≠ {span.mismatch}", style="bold yellow")
            elif layer_map.source in (LOADED, SWARM) and span.planned_count is not None \
                    and span.node != COORDINATOR:
                text.append(" = plan", style="green")
            share = self.bottleneck.part_text(span.node) if self.bottleneck else ""
            if share:
                text.append(f"  {share}", style="bold red" if "◀" in share else "")
        if self.bottleneck is not None and self.bottleneck.slowest is not None:
            age = self.bottleneck.age_s
            when = "" if age < 2 else f" (measured {age:.0f} s ago)"
            text.append(f"\n◀ {sanitize(self.bottleneck.sentence())}{when}", style="bold")
        if cold:
            text.append(f"\n{COLD} cold: {_blocks(cold)} not in their node's cache "
                        "(the next load sends them; torbiz-tui cache warm)", style="yellow")
        if unserved:
            shown = ", ".join(str(b) for b in sorted(unserved)[:12])
            more = "" if len(unserved) <= 12 else f" and {len(unserved) - 12} more"
            text.append(f"\n{UNSERVED} not served: block{'s' if len(unserved) > 1 else ''} "
                        f"{shown}{more}", style=UNSERVED_COLOUR)
        return text
