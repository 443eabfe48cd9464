"""The fitted ColumnTransformer compiled to plain numpy: the same numbers from the same fitted
parameters, without pandas or scikit-learn on the serving path.

`training/encoder_compiler.py` reads the parameters out of the fitted transformer when a model is
imported and refuses to store the compiled form unless it reproduces the transformer exactly on
random rows; `tests/test_encoder.py` checks the same on many more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class NumericBlock:
    """SimpleImputer (fill) then an optional StandardScaler (center, scale), per column."""

    columns: tuple[str, ...]
    fill: np.ndarray
    center: np.ndarray | None = None
    scale: np.ndarray | None = None

    @property
    def width(self) -> int:
        return len(self.columns)

    def encode(self, raw: np.ndarray, out: np.ndarray) -> None:
        """raw: the block's input columns (object: numbers, booleans; None or NaN if missing)."""
        numbers = np.where(raw == None, np.nan, raw).astype(np.float64)  # noqa: E711 (elementwise)
        self.encode_numbers(numbers, out)

    def encode_frame(self, frame: pd.DataFrame, out: np.ndarray) -> None:
        self.encode_numbers(frame[list(self.columns)].to_numpy(np.float64, copy=True), out)

    def encode_numbers(self, values: np.ndarray, out: np.ndarray) -> None:
        """values: float64 with NaN where missing (changed in place)."""
        missing = np.isnan(values)
        if missing.any():
            values[missing] = np.broadcast_to(self.fill, values.shape)[missing]
        if self.center is not None:
            values -= self.center
        if self.scale is not None:
            values /= self.scale
        out[:] = values


@dataclass(frozen=True)
class OneHotBlock:
    """OneHotEncoder over fixed categories; missing and unknown values encode as all zeros."""

    columns: tuple[str, ...]
    categories: tuple[tuple[str, ...], ...]

    @property
    def width(self) -> int:
        return sum(len(c) for c in self.categories)

    def encode(self, raw: np.ndarray, out: np.ndarray) -> None:
        codes = []
        for j, categories in enumerate(self.categories):
            index: dict[Any, int] = {value: i for i, value in enumerate(categories)}
            codes.append(np.fromiter((index.get(v, -1) for v in raw[:, j]), np.int64, len(raw)))
        self._scatter(codes, out)

    def encode_frame(self, frame: pd.DataFrame, out: np.ndarray) -> None:
        import pandas as pd  # batch scoring only: the serving preprocessor never loads pandas

        codes = []  # -1 for missing and unknown values
        for column, categories in zip(self.columns, self.categories, strict=True):
            values = frame[column]
            if isinstance(values.dtype, pd.CategoricalDtype):  # its codes, mapped to ours
                ours = pd.Index(categories).get_indexer(values.cat.categories)
                codes.append(np.append(ours, -1)[values.cat.codes.to_numpy()])  # -1 stays -1
            else:
                codes.append(pd.Index(categories).get_indexer(pd.Index(values)))
        self._scatter([np.asarray(c, dtype=np.int64) for c in codes], out)

    def _scatter(self, codes: list[np.ndarray], out: np.ndarray) -> None:
        """One-hot columns from category codes (-1: missing or unknown)."""
        out[:] = 0.0
        offset = 0
        positions = np.arange(len(out))
        for column_codes, categories in zip(codes, self.categories, strict=True):
            known = column_codes >= 0
            out[positions[known], offset + column_codes[known]] = 1.0
            offset += len(categories)


Block = NumericBlock | OneHotBlock


@dataclass(frozen=True)
class Encoder:
    """Raw values (n x input columns, object) -> the transformer's output matrix (float64)."""

    input_columns: tuple[str, ...]
    blocks: tuple[Block, ...]
    feature_names: tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = {c for b in self.blocks for c in b.columns} - set(self.input_columns)
        if unknown:
            raise ValueError(f"encoder blocks read columns it is not given: {sorted(unknown)}")
        if sum(b.width for b in self.blocks) != len(self.feature_names):
            raise ValueError("encoder blocks do not add up to its feature names")
        position = {name: i for i, name in enumerate(self.input_columns)}
        indices = tuple(np.array([position[c] for c in b.columns]) for b in self.blocks)
        object.__setattr__(self, "_indices", indices)

    def encode_frame(self, frame: pd.DataFrame) -> np.ndarray:
        """The same from a frame typed by `UseCase.frame` (batch scoring: no object matrix)."""
        out = np.empty((len(frame), len(self.feature_names)), dtype=np.float64)
        start = 0
        for block in self.blocks:
            block.encode_frame(frame, out[:, start : start + block.width])
            start += block.width
        return out

    def encode(self, raw: np.ndarray) -> np.ndarray:
        out = np.empty((len(raw), len(self.feature_names)), dtype=np.float64)
        start = 0
        for block, columns in zip(self.blocks, self._indices, strict=True):  # type: ignore[attr-defined]
            block.encode(raw[:, columns], out[:, start : start + block.width])
            start += block.width
        return out

    def to_dict(self) -> dict[str, Any]:
        blocks: list[dict[str, Any]] = []
        for block in self.blocks:
            if isinstance(block, NumericBlock):
                blocks.append(
                    {
                        "kind": "numeric",
                        "columns": list(block.columns),
                        "fill": block.fill.tolist(),
                        "center": None if block.center is None else block.center.tolist(),
                        "scale": None if block.scale is None else block.scale.tolist(),
                    }
                )
            else:
                blocks.append(
                    {
                        "kind": "onehot",
                        "columns": list(block.columns),
                        "categories": [list(c) for c in block.categories],
                    }
                )
        return {
            "input_columns": list(self.input_columns),
            "blocks": blocks,
            "feature_names": list(self.feature_names),
        }

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> Encoder:
        def array(values: list[float] | None) -> np.ndarray | None:
            return None if values is None else np.asarray(values, dtype=np.float64)

        blocks: list[Block] = []
        for block in spec["blocks"]:
            if block["kind"] == "numeric":
                fill = array(block["fill"])
                assert fill is not None
                blocks.append(
                    NumericBlock(
                        tuple(block["columns"]), fill, array(block["center"]), array(block["scale"])
                    )
                )
            elif block["kind"] == "onehot":
                categories = tuple(tuple(c) for c in block["categories"])
                blocks.append(OneHotBlock(tuple(block["columns"]), categories))
            else:
                raise ValueError(f"unknown encoder block kind {block['kind']!r}")
        return cls(tuple(spec["input_columns"]), tuple(blocks), tuple(spec["feature_names"]))
