"""The recipe: everything that decides what a descriptor means.

It is saved with the index; descriptors made with another recipe are not
comparable, so a mismatch is refused rather than silently mixed.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace


class RecipeMismatch(Exception):
    """The database was built with another recipe than the one asked for."""


@dataclass(frozen=True)
class Recipe:
    """How descriptors are made: backbone, layer, pooling and preprocessing."""

    model: str
    weights_sha256: str
    layer: str
    pooling: str
    gem_p: float
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int
    # Scales of the image, relative to image_size, whose descriptors are summed.
    scales: tuple[float, ...] = (1.0,)
    # Local features for verification (indexer.local); "none" in databases from before them.
    local_features: str = "none"
    local_size: int = 0  # longest side of the grey picture they are found in
    local_keypoints: int = 0  # the strongest kept
    local_codec: str = ""  # how descriptors are stored, with the projection's checksum

    @property
    def has_local(self) -> bool:
        return self.local_features != "none"

    def global_only(self) -> "Recipe":
        """This recipe without local features: what a descriptor alone needs decoded."""
        return replace(self, local_features="none", local_size=0, local_keypoints=0, local_codec="")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        data = json.loads(text)
        data["mean"] = tuple(data["mean"])
        data["std"] = tuple(data["std"])
        data["scales"] = tuple(data.get("scales", (1.0,)))  # databases from before multi-scale
        # Fields added since a database was made take their defaults (no local features).
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def differences(self, other: "Recipe") -> list[str]:
        """Human-readable list of fields where ``other`` differs from ``self``."""
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                if f.name == "weights_sha256":
                    mine, theirs = str(mine)[:12], str(theirs)[:12]
                out.append(f"{f.name}: index has {mine}, asked for {theirs}")
        return out

    def require_same(self, other: "Recipe", db: str) -> None:
        """Raise RecipeMismatch naming every differing field."""
        diff = self.differences(other)
        if diff:
            raise RecipeMismatch(
                f"{db} was built with another recipe ({'; '.join(diff)}); "
                "use the same options or a new --db"
            )


POOLINGS = ("gem", "mac", "spoc", "rmac")


MULTI_SCALE = (1.0, 0.7071, 0.5)
# The default for a new index: the image at image_size and at half of it. The
# half-size pass costs a quarter of the full one and makes descriptors of a
# crop, a thumbnail or a zoomed copy agree better with the original's.
DEFAULT_SCALES = (1.0, 0.5)


def make_recipe(model: str, *, layer: str | None = None, pooling: str = "gem", gem_p: float = 3.0,
                image_size: int = 448, weights_sha256: str,
                scales: tuple[float, ...] = DEFAULT_SCALES, local_features: str | None = None,
                keypoints: int | None = None, local_size: int | None = None) -> Recipe:
    """A complete recipe from the user's choices and the spec of the model.

    ``local_features`` (default: the local module's DEFAULT_KIND), ``keypoints``
    (the strongest kept per image) and ``local_size`` (the working picture's
    longest side) say what is stored for verification; None takes the defaults.
    """
    from . import local
    from .backbone import check_layer, get_spec, layer_dim

    spec = get_spec(model)
    layer = check_layer(spec, layer)
    scales = tuple(sorted({round(float(s), 4) for s in scales}, reverse=True))
    if not scales or not all(0.1 <= s <= 2.0 for s in scales):
        raise ValueError(f"scales {scales} out of range 0.1..2.0")
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if not 32 <= image_size <= 4096:
        raise ValueError(f"image size {image_size} out of range 32..4096")
    kind = local.DEFAULT_KIND if local_features is None else local_features
    if kind not in local.KINDS:
        raise ValueError(f"unknown local features {kind!r}; choose one of {', '.join(local.KINDS)}")
    keypoints = local.DEFAULT_KEYPOINTS if keypoints is None else int(keypoints)
    if not 16 <= keypoints <= local.MAX_KEYPOINTS:
        raise ValueError(f"keypoints {keypoints} out of range 16..{local.MAX_KEYPOINTS}")
    has = kind != "none"
    return Recipe(model=spec.name, weights_sha256=weights_sha256, layer=layer, pooling=pooling,
                  gem_p=float(gem_p) if pooling == "gem" else 0.0, image_size=int(image_size),
                  mean=spec.mean, std=spec.std, dim=layer_dim(spec, layer), scales=scales,
                  local_features=kind, local_size=(local_size or local.DEFAULT_SIZE) if has else 0,
                  local_keypoints=keypoints if has else 0, local_codec=local.codec() if has else "")
