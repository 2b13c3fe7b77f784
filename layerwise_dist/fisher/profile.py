"""FisherProfile: the per-layer result of a Fisher pass, with its controls, I/O and summaries."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from layerwise_dist.weighting import normalize


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties get their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (Pearson on average ranks); nan when either side is constant."""
    if len(a) != len(b):
        raise ValueError(f"spearman needs equal lengths; got {len(a)} and {len(b)}")
    ra, rb = _ranks(list(a)), _ranks(list(b))
    n = len(ra)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return float("nan")
    return cov / math.sqrt(va * vb)


@dataclass
class FisherProfile:
    """Per-layer Fisher information of a teacher on a task, plus layer-redundancy controls.

    ``scores[l]`` is F_l = (1/N) sum_n ||d log p(y_n|x_n) / d theta_l||^2 (parameter form)
    or (1/N) sum_n ||d log p(y_n|x_n) / d h_l||^2 (activation form, block outputs).
    ``module_scores`` splits the parameter form into ``attention`` (q,k,v,o, q/k norms + input norm;
    Gemma's post-attention norm too) and ``mlp`` (gate,up,down + the norm before the MLP, Llama's
    post-attention norm; Gemma's pre/post-feedforward norms); it is empty for the activation form.
    ``block_influence[l]`` = mean over real tokens of 1 - cos(h_in, h_out) (ShortGPT) and
    ``angular_distance[l]`` = mean of arccos(cos(h_in, h_out)) / pi.
    """

    scores: list[float]
    module_scores: dict[str, list[float]] = field(default_factory=dict)
    block_influence: list[float] = field(default_factory=list)
    angular_distance: list[float] = field(default_factory=list)
    form: str = "parameter"
    labels: str = "empirical"
    num_examples: int = 0
    num_tokens: int = 0
    model_id: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        n = len(self.scores)
        for name in ("block_influence", "angular_distance"):
            values = getattr(self, name)
            if values and len(values) != n:
                raise ValueError(f"{name} has {len(values)} layers, scores has {n}")
        for key, values in self.module_scores.items():
            if len(values) != n:
                raise ValueError(f"module_scores[{key!r}] has {len(values)} layers, scores has {n}")

    @property
    def num_layers(self) -> int:
        return len(self.scores)

    # -- I/O ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load_json(cls, path: str | Path) -> FisherProfile:
        data = json.loads(Path(path).read_text())
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown FisherProfile keys {unknown}")
        return cls(**data)

    # -- derived views ------------------------------------------------------------------------
    def normalized(self, temperature: float = 1.0) -> list[float]:
        """Layer weights ~ F_l^(1/temperature), summing to 1 (:func:`layerwise_dist.weighting.normalize`;
        an all-zero profile raises :class:`~layerwise_dist.weighting.WeightingError`)."""
        return normalize(self.scores, temperature)

    def top_layers(self, k: int) -> list[int]:
        """Indices of the k layers with the largest Fisher score (ties: lower index first)."""
        if not 0 <= k <= self.num_layers:
            raise ValueError(f"k must be in [0, {self.num_layers}]; got {k}")
        return sorted(range(self.num_layers), key=lambda i: (-self.scores[i], i))[:k]

    def depth_shares(self, frac: float = 0.3) -> tuple[float, float]:
        """(share of Fisher mass in the top `frac` of layers by depth, share in the bottom `frac`).

        H1 (upper layers carry the task) predicts the first number exceeds the second.
        """
        if not 0 < frac <= 0.5:
            raise ValueError(f"frac must be in (0, 0.5]; got {frac}")
        weights = self.normalized()
        k = max(1, round(frac * self.num_layers))
        return sum(weights[-k:]), sum(weights[:k])

    def spearman(self, other: FisherProfile | list[float]) -> float:
        """Spearman rank correlation of the per-layer scores with another profile (or any per-layer list)."""
        values = other.scores if isinstance(other, FisherProfile) else list(other)
        return spearman(self.scores, values)

    def summary(self, top_k: int = 5) -> str:
        weights = self.normalized()
        top, bottom = self.depth_shares()
        lines = [
            f"Fisher profile ({self.form} form, {self.labels} labels) of {self.model_id or 'model'}: "
            f"{self.num_layers} layers, {self.num_examples} examples, {self.num_tokens} tokens",
            f"  top layers: {self.top_layers(min(top_k, self.num_layers))}",
            f"  depth shares (H1): top 30% of layers hold {top:.1%} of the Fisher mass, bottom 30% hold {bottom:.1%}",
        ]
        if self.block_influence:
            lines.append(f"  spearman(Fisher, block influence) = {self.spearman(self.block_influence):+.3f}")
        split = bool(self.module_scores)
        header = f"  {'layer':>5} {'F_l':>12} {'share':>7}" + (f" {'attn%':>6}" if split else "")
        header += f" {'BI':>8}" if self.block_influence else ""
        header += f" {'angular':>8}" if self.angular_distance else ""
        lines.append(header)
        for i, s in enumerate(self.scores):
            row = f"  {i:>5} {s:>12.5g} {weights[i]:>7.2%}"
            if split:
                attn = self.module_scores["attention"][i]
                row += f" {attn / s:>6.1%}" if s > 0 else f" {'-':>6}"
            if self.block_influence:
                row += f" {self.block_influence[i]:>8.4f}"
            if self.angular_distance:
                row += f" {self.angular_distance[i]:>8.4f}"
            lines.append(row)
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """PNG: normalised Fisher per layer (attention/MLP stacked when split) and the two controls."""
        from matplotlib.figure import Figure  # the object API: no backend switch, no pyplot state

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        layers = list(range(self.num_layers))
        total = sum(self.scores) or 1.0
        fig = Figure(figsize=(max(6.0, 0.3 * self.num_layers + 3), 6))
        ax1, ax2 = fig.subplots(2, 1, sharex=True)
        if self.module_scores:
            attn = [v / total for v in self.module_scores["attention"]]
            mlp = [v / total for v in self.module_scores["mlp"]]
            ax1.bar(layers, attn, label="attention", color="tab:blue")
            ax1.bar(layers, mlp, bottom=attn, label="mlp", color="tab:orange")
            ax1.legend()
        else:
            ax1.bar(layers, self.normalized(), color="tab:blue")
        ax1.set_ylabel("Fisher share")
        ax1.set_title(f"{self.model_id or 'model'}: {self.form} Fisher, {self.labels} labels, N={self.num_examples}")
        controls = (
            ("block influence (1 - cos)", "o", self.block_influence),
            ("angular distance / pi", "s", self.angular_distance),
        )
        for label, marker, values in controls:
            if values:  # either may be absent (a profile written with one control only)
                ax2.plot(layers, values, marker=marker, label=label)
        if self.block_influence or self.angular_distance:
            ax2.legend()
        ax2.set_xlabel("layer")
        ax2.set_ylabel("control")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        return path
