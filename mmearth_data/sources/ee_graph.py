"""Band plumbing of a serialised Earth Engine image expression, evaluated locally without the service.

Data flow: a ``computePixels`` request (``expression.serialize(for_cloud_api=True)``) + the band names
of the assets it loads -> :func:`band_plumbing` -> for every output band, which asset band it comes
from (or that it is a masked placeholder) and the operations applied to it on the way.

Earth Engine evaluates the same graph on real pixels; here every image is a list of named bands whose
"value" is its provenance, and each function the recipe uses has a rule for what it does to band names
and order, as the service documents it: ``Image.select(selectors, newNames)`` renames each selector's
match by name, ``Image.rename`` is positional, ``Image.addBands(dst, src, overwrite=True)`` drops the
overwritten bands of ``dst`` and appends ``src``'s, ``Image.constant([...])`` names its bands
``constant_0..``, unary and binary pixel operations keep the first operand's names, ``Terrain.slope``
returns one band ``slope``, collection reductions and mosaics keep the names. A function without a rule
raises :class:`GraphError`, so a recipe change that this evaluator does not understand fails loudly
instead of passing unchecked. Selectors are regular expressions matched against whole band names, and a
selector that matches nothing is an error, as on the service.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

PLACEHOLDER = "<placeholder>"


class GraphError(ValueError):
    """The expression uses a function without a band rule, or does what the service would refuse."""


@dataclass(frozen=True)
class Band:
    """One band: its current name, where its values come from (``assets``: the loaded asset ids or
    ``<placeholder>`` for a constant; ``source``: the band's name in that asset) and the operations
    applied since, in order (``resample:bilinear``, ``reproject:EPSG:32633:[30, 0, ...]``, ...)."""

    name: str
    assets: tuple[str, ...]
    source: str
    ops: tuple[str, ...] = ()
    masked: bool = False

    @property
    def placeholder(self) -> bool:
        return self.assets == (PLACEHOLDER,)

    def op(self, text: str) -> Band:
        return replace(self, ops=self.ops + (text,))


@dataclass(frozen=True)
class Img:
    bands: tuple[Band, ...]

    def names(self) -> list[str]:
        return [b.name for b in self.bands]

    def map(self, fn: Callable[[Band], Band]) -> Img:
        return Img(tuple(fn(b) for b in self.bands))


@dataclass(frozen=True)
class Coll:
    """An image collection. Loaded collections are represented by one template image (its members'
    bands); ``fromImages`` collections by their images."""

    images: tuple[Img, ...]
    explicit: bool = False


@dataclass(frozen=True)
class Opaque:
    """A value without bands (geometry, filter, date, projection...)."""

    function: str
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Closure:
    names: tuple[str, ...]
    body: str


OPAQUE_PREFIXES = (
    "GeometryConstructors.",
    "Geometry.",
    "Filter.",
    "ErrorMargin",
    "Projection",
    "Date",
    "Feature",
)
ELEMENTWISE = {
    "Image.toFloat", "Image.toUint8", "Image.toUint16", "Image.toInt16", "Image.round", "Image.mask",
    "Image.add", "Image.subtract", "Image.multiply", "Image.divide", "Image.rightShift",
    "Image.leftShift", "Image.bitwiseAnd", "Image.eq", "Image.neq", "Image.gt", "Image.gte", "Image.lt",
    "Image.lte", "Image.or", "Image.and", "Image.where", "Image.clamp",
}  # fmt: skip
REDUCTIONS = {"reduce.mode", "reduce.mean", "reduce.median", "reduce.min", "reduce.max", "reduce.sum"}


def _constant(v: Any) -> Any:
    """The number behind a constant (a plain number, or a one-band ``Image.constant``), else ``v``."""
    if isinstance(v, Img) and len(v.bands) == 1 and v.bands[0].source.startswith("constant="):
        return float(v.bands[0].source.split("=", 1)[1])
    return v


def _full_match(selector: str, name: str) -> bool:
    return re.fullmatch(selector, name) is not None


class Evaluator:
    """Evaluates one serialised expression. ``asset_bands(asset_id)`` gives an asset's band names (for
    a collection id: its images' band names)."""

    def __init__(self, graph: Mapping[str, Any], asset_bands: Callable[[str], list[str]]):
        self.values = graph["values"]
        self.result = graph["result"]
        self.asset_bands = asset_bands
        self.cache: dict[str, Any] = {}

    def run(self) -> Any:
        return self.ref(self.result, {})

    def ref(self, key: str, env: dict[str, Any]) -> Any:
        if env:  # inside a function body: references may depend on arguments
            return self.node(self.values[key], env)
        if key not in self.cache:
            self.cache[key] = self.node(self.values[key], env)
        return self.cache[key]

    def node(self, n: Mapping[str, Any], env: dict[str, Any]) -> Any:
        if "constantValue" in n:
            return n["constantValue"]
        if "valueReference" in n:
            return self.ref(n["valueReference"], env)
        if "argumentReference" in n:
            return env[n["argumentReference"]]
        if "arrayValue" in n:
            return [self.node(v, env) for v in n["arrayValue"]["values"]]
        if "dictionaryValue" in n:
            return {k: self.node(v, env) for k, v in n["dictionaryValue"]["values"].items()}
        if "functionDefinitionValue" in n:
            d = n["functionDefinitionValue"]
            return Closure(tuple(d["argumentNames"]), d["body"])
        if "functionInvocationValue" in n:
            f = n["functionInvocationValue"]
            args = {k: self.node(v, env) for k, v in f.get("arguments", {}).items()}
            return self.call(f["functionName"], args)
        if "nullValue" in n:
            return None
        raise GraphError(f"unknown node {sorted(n)}")

    def apply(self, fn: Closure, value: Any) -> Any:
        return self.ref(fn.body, {fn.names[0]: value})

    # --- functions ------------------------------------------------------------------------------
    def call(self, name: str, a: dict[str, Any]) -> Any:
        if name.startswith(OPAQUE_PREFIXES):
            return Opaque(name, a)
        if name in ELEMENTWISE:
            first = a.get("input", a.get("image", a.get("image1", a.get("value"))))
            return self.image(first, name).map(lambda b: b.op(name.split(".", 1)[1]))
        handler = getattr(self, "f_" + name.replace(".", "_"), None)
        if handler is None and name in REDUCTIONS:
            return self.template(a["collection"], name).map(lambda b: b.op(name))
        if handler is None:
            raise GraphError(f"no band rule for {name}: teach mmearth_data.sources.ee_graph what it does")
        return handler(a)

    def image(self, v: Any, where: str) -> Img:
        if not isinstance(v, Img):
            raise GraphError(f"{where}: expected an image, got {type(v).__name__}")
        return v

    def template(self, v: Any, where: str) -> Img:
        if not isinstance(v, Coll) or not v.images:
            raise GraphError(f"{where}: expected an image collection, got {type(v).__name__}")
        if v.explicit and len(v.images) > 1:
            # several images stacked by name: a band's values may come from any of them
            first = v.images[0]
            bands = []
            for b in first.bands:
                others = [o for img in v.images[1:] for o in img.bands if o.name == b.name]
                assets = tuple(dict.fromkeys(b.assets + tuple(x for o in others for x in o.assets)))
                bands.append(replace(b, assets=assets))
            return Img(tuple(bands))
        return v.images[0]

    def f_Image_load(self, a):
        asset = a["id"]
        return Img(tuple(Band(n, (asset,), n) for n in self.asset_bands(asset)))

    def f_ImageCollection_load(self, a):
        asset = a["id"]
        return Coll((Img(tuple(Band(n, (asset + "/*",), n) for n in self.asset_bands(asset))),))

    def f_ImageCollection_fromImages(self, a):
        return Coll(tuple(self.image(i, "fromImages") for i in a["images"]), explicit=True)

    def f_Collection_filter(self, a):
        return a["collection"]

    def f_Collection_map(self, a):
        c = a["collection"]
        if not isinstance(c, Coll):
            raise GraphError("Collection.map over a non-image collection")
        return Coll(tuple(self.apply(a["baseAlgorithm"], img) for img in c.images), c.explicit)

    def f_Collection_first(self, a):
        return self.template(a["collection"], "Collection.first").map(lambda b: b.op("first"))

    def f_ImageCollection_mosaic(self, a):
        return self.template(a["collection"], "mosaic").map(lambda b: b.op("mosaic"))

    def f_Image_constant(self, a):
        v = a["value"]
        vals = v if isinstance(v, list) else [v]
        names = [f"constant_{k}" for k in range(len(vals))] if isinstance(v, list) else ["constant"]
        return Img(tuple(Band(n, (PLACEHOLDER,), f"constant={x}") for n, x in zip(names, vals, strict=True)))

    def f_Image_select(self, a):
        img = self.image(a["input"], "Image.select")
        selectors = a["bandSelectors"]
        selectors = selectors if isinstance(selectors, list) else [selectors]
        new = a.get("newNames")
        out: list[Band] = []
        for k, sel in enumerate(selectors):
            if isinstance(sel, int):
                hits = [img.bands[sel]]
            else:
                hits = [b for b in img.bands if _full_match(str(sel), b.name)]
            if not hits:
                raise GraphError(f"Image.select: Pattern '{sel}' did not match any bands.")
            if new is not None:
                if len(hits) != 1:
                    raise GraphError(f"Image.select: selector '{sel}' matched {len(hits)} bands for one name")
                hits = [replace(hits[0], name=new[k])]
            out += hits
        if new is not None and len(new) != len(selectors):
            raise GraphError("Image.select: newNames and bandSelectors differ in length")
        return Img(tuple(out))

    def f_Image_rename(self, a):
        img = self.image(a["input"], "Image.rename")
        names = a["names"] if isinstance(a["names"], list) else [a["names"]]
        if len(names) != len(img.bands):
            raise GraphError(f"Image.rename: {len(names)} names for {len(img.bands)} bands")
        return Img(tuple(replace(b, name=n) for b, n in zip(img.bands, names, strict=True)))

    def f_Image_regexpRename(self, a):
        img = self.image(a["input"], "Image.regexpRename")
        rx, rep = a["regex"], a["replacement"].replace("$", "\\")
        return img.map(lambda b: replace(b, name=re.sub(rx, rep, b.name)))

    def f_Image_addBands(self, a):
        dst, src = self.image(a["dstImg"], "addBands"), self.image(a["srcImg"], "addBands")
        names = a.get("names")
        if names is not None:
            src = Img(tuple(b for b in src.bands if b.name in names))
        if a.get("overwrite"):
            replaced = set(src.names())
            return Img(tuple(b for b in dst.bands if b.name not in replaced) + src.bands)
        clash = set(dst.names()) & set(src.names())
        if clash:
            raise GraphError(f"Image.addBands: band names {sorted(clash)} in both images (no overwrite)")
        return Img(dst.bands + src.bands)

    def f_Image_updateMask(self, a):
        full = _constant(a["mask"]) == 0
        img = self.image(a["image"], "updateMask")
        return img.map(lambda b: replace(b.op("updateMask"), masked=b.masked or full))

    def f_Image_unmask(self, a):
        return self.image(a["input"], "unmask").map(lambda b: b.op(f"unmask:{_constant(a.get('value'))}"))

    def f_Image_resample(self, a):
        mode = a.get("mode", "bilinear")
        return self.image(a["image"], "resample").map(lambda b: b.op(f"resample:{mode}"))

    def f_Image_reproject(self, a):
        crs = a["crs"]
        crs = crs.args.get("crs") if isinstance(crs, Opaque) else crs
        text = f"reproject:{crs}:{a.get('crsTransform')}:{a.get('scale')}"
        return self.image(a["image"], "reproject").map(lambda b: b.op(text))

    def f_Image_setDefaultProjection(self, a):
        text = f"setDefaultProjection:{a.get('crs')}:{a.get('crsTransform')}:{a.get('scale')}"
        return self.image(a["image"], "setDefaultProjection").map(lambda b: b.op(text))

    def f_Terrain_slope(self, a):
        img = self.image(a["input"], "Terrain.slope")
        src = next((b for b in img.bands if b.name == "elevation"), img.bands[0])
        return Img((replace(src.op("Terrain.slope"), name="slope"),))

    def f_Image_clip(self, a):
        return self.image(a["input"], "clip").map(lambda b: b.op("clip"))


def band_plumbing(expression: Mapping[str, Any], asset_bands: Callable[[str], list[str]]) -> dict[str, Band]:
    """Output band name -> :class:`Band` for a serialised image expression (the ``expression`` of a
    ``computePixels`` request as ``serialize(for_cloud_api=True)`` writes it, parsed)."""
    out = Evaluator(expression, asset_bands).run()
    if not isinstance(out, Img):
        raise GraphError(f"the expression is a {type(out).__name__}, not an image")
    names = out.names()
    if len(set(names)) != len(names):
        raise GraphError(f"the expression's output has duplicate band names: {names}")
    return {b.name: b for b in out.bands}
