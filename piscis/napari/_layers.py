"""Between napari layers and the core's arrays (no Qt here).

Spots and masks live in the pixel frame of their image; napari draws each
layer with its own scale and translate. Only scale and translate of the last
two axes are honoured (no rotation, shear or affine).
"""

from __future__ import annotations

import numpy as np
import pandas as pd  # here, not at the first result: its import takes a noticeable moment

from ..annotate import axes_choices, image_array, plane

ROLE = "piscis"  # key of our entry in layer.metadata


def meta(layer) -> dict:
    """Our metadata entry of a layer (created if missing)."""
    md = layer.metadata
    if ROLE not in md or not isinstance(md[ROLE], dict):
        md[ROLE] = {}
    return md[ROLE]


def camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def yx_transform(layer) -> tuple[np.ndarray, np.ndarray]:
    """Scale and translate of the layer's last two axes."""
    return np.asarray(layer.scale[-2:], float), np.asarray(layer.translate[-2:], float)


def aligned_kwargs(image_layer) -> dict:
    """scale/translate for a new 2D layer drawn on the image's pixels."""
    s, t = yx_transform(image_layer)
    return {"scale": tuple(s), "translate": tuple(t)}


def to_pixels(coords, layer, image_layer) -> np.ndarray:
    """Coordinates of ``layer`` (its data frame, last two axes) in the image's pixels."""
    c = np.asarray(coords, float)
    c = c.reshape(-1, c.shape[-1] if c.ndim == 2 and c.shape[-1] else 2)[:, -2:]
    ls, lt = yx_transform(layer)
    s, t = yx_transform(image_layer)
    return (c * ls + lt - t) / s


def from_pixels(pixels, layer, image_layer) -> np.ndarray:
    """Inverse of :func:`to_pixels` (2D layers)."""
    p = np.asarray(pixels, float).reshape(-1, 2)
    ls, lt = yx_transform(layer)
    s, t = yx_transform(image_layer)
    return (p * s + t - lt) / ls


def layer_axes_choices(layer) -> list[str]:
    """:func:`piscis.annotate.axes_choices` of a layer, the axes its reader recorded
    (``metadata["piscis"]["axes"]``, e.g. a 6-plane ZYX stack or a TZYX time series)
    first when they can run."""
    known = meta(layer).get("axes")
    return axes_choices(layer_shape(layer), getattr(layer, "rgb", False), recorded=known)


def default_axes(layer) -> str:
    choices = layer_axes_choices(layer)
    return choices[0] if choices else ""


def layer_shape(layer) -> tuple[int, ...]:
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    return tuple(data.shape)


def layer_plane(
    layer, axes: str | None = None, channel: int | None = None, time: int | None = None
) -> np.ndarray:
    """The 2D (Y, X) plane of an image layer (a Z axis max-projected; time point
    ``time`` of a T axis, default 0)."""
    axes = axes or default_axes(layer)
    return plane(layer.data, axes, channel, name=layer.name, time=time)


def layer_image(
    layer, axes: str | None = None, channel: int | None = None, time: int | None = None
):
    """What the detector runs on: the (Y, X) plane of a 2D layer, the (Z, Y, X) volume
    of a layer with a Z axis (not projected; a lazy array stays lazy), at time point
    ``time`` of a T axis (default 0). RGB layers give their plane."""
    axes = axes or default_axes(layer)
    if getattr(layer, "rgb", False) or "Z" not in axes:
        return layer_plane(layer, axes, channel, time)
    return image_array(layer.data, axes, channel, name=layer.name, time=time)


def current_index(viewer, layer, axis: int) -> int | None:
    """The layer's index along its dimension ``axis`` at the viewer's current position
    (``viewer.dims``: its sliders' steps in world coordinates, mapped through the
    layer's transform), within the layer; None when the viewer has no position."""
    point = getattr(getattr(viewer, "dims", None), "point", None)
    if point is None or len(point) == 0:
        return None
    try:
        pos = float(np.asarray(layer.world_to_data(point), float)[axis])
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    if not np.isfinite(pos):
        return None
    n = layer_shape(layer)[axis]
    return int(np.clip(np.floor(pos + 0.5), 0, n - 1))


def volume_axes(layer, axes: str) -> list[int] | None:
    """Positions of Z, Y, X among the layer's dimensions when ``axes`` (one letter per
    layer dimension) has a Z axis; None otherwise."""
    if "Z" not in axes or len(axes) != layer.ndim:
        return None
    return [axes.index(a) for a in "ZYX"]


def points_from_voxels(
    zyx, layer, axes: str, channel: int | None = None, time: int | None = None
) -> np.ndarray:
    """(N, layer.ndim) Points data in the layer's data frame from (z, y, x) voxels, or
    (y, x) pixels when ``axes`` have no Z (a C axis gets the channel index, a T axis
    the time point, 0 by default)."""
    spatial = "ZYX" if "Z" in axes else "YX"
    zyx = np.asarray(zyx, float).reshape(-1, len(spatial))
    out = np.zeros((len(zyx), layer.ndim))
    for i, a in enumerate(axes):
        if a in spatial:
            out[:, i] = zyx[:, spatial.index(a)]
        elif a == "C":
            out[:, i] = 0 if channel is None else channel
        elif a == "T":
            out[:, i] = 0 if time is None else time
    return out


def voxels_of_points(data, points_layer, image_layer, axes: str | None = None) -> np.ndarray:
    """(z, y, x) voxels of the image from a Points layer's data (world = data * scale
    + translate on either layer; the points layer spans the image's dimensions or
    its last three)."""
    axes = axes or default_axes(image_layer)
    dims = volume_axes(image_layer, axes)
    if dims is None:
        raise ValueError(f"{image_layer.name!r}: axes {axes} have no Z axis")
    c = np.asarray(data, float).reshape(-1, points_layer.ndim)
    world = c * np.asarray(points_layer.scale) + np.asarray(points_layer.translate)
    nd = image_layer.ndim
    if points_layer.ndim < nd:  # napari aligns trailing dimensions
        pad = np.zeros((len(world), nd - points_layer.ndim))
        world = np.hstack([pad, world])
    world = world[:, -nd:]
    pix = (world - np.asarray(image_layer.translate)) / np.asarray(image_layer.scale)
    return pix[:, dims]


def source_name(layer) -> str:
    """The file a layer came from, else its name (the ``image`` column of cells.csv)."""
    path = getattr(getattr(layer, "source", None), "path", None)
    return str(path) if path else layer.name


def region_mask(region_layer, image_layer, shape) -> np.ndarray | None:
    """The annotated region as a bool mask on the image's pixels, or None (whole image).

    A Shapes layer: the union of its shapes (clipped to the image); a Labels
    layer: its non-zero pixels (same shape as the image).
    """
    if region_layer is None:
        return None
    from napari.layers import Labels, Shapes

    if isinstance(region_layer, Labels):
        data = np.asarray(region_layer.data)
        if data.shape[-2:] != tuple(shape):
            raise ValueError(
                f"region labels {region_layer.name!r} have shape {data.shape[-2:]}, "
                f"the image {tuple(shape)}"
            )
        while data.ndim > 2:
            data = data.max(axis=0)
        return data > 0
    if isinstance(region_layer, Shapes):
        if len(region_layer.data) == 0:
            return None
        verts = [to_pixels(d, region_layer, image_layer) for d in region_layer.data]
        tmp = Shapes(verts, shape_type=list(region_layer.shape_type))
        masks = np.asarray(tmp.to_masks(mask_shape=tuple(shape)))
        return masks.any(axis=0)
    raise TypeError(f"{region_layer.name!r} is neither a Shapes nor a Labels layer")


def roi_of_shapes(shapes_layer, image_layer) -> tuple[float, float, float, float] | None:
    """The bounding box (y0, x0, height, width) of a Shapes layer's shapes, in the
    image's pixels, or None when it has none. Parts off the image are clipped later."""
    if shapes_layer is None or len(shapes_layer.data) == 0:
        return None
    verts = np.concatenate([to_pixels(d, shapes_layer, image_layer) for d in shapes_layer.data])
    lo, hi = verts.min(axis=0), verts.max(axis=0)
    return float(lo[0]), float(lo[1]), float(hi[0] - lo[0]), float(hi[1] - lo[1])


def spots_features(spots, n: int | None = None) -> dict[str, np.ndarray]:
    """Per-spot features of a core :class:`~piscis.detect.Spots` for a Points layer."""
    n = len(spots) if n is None else n
    feats = {
        "score": np.asarray(spots.score, float),
        "intensity": np.asarray(spots.intensity, float),
        "background": np.asarray(spots.background, float),
        "cell_id": np.full(n, np.nan),
    }
    return feats


def points_data_from_voxels(zyx, points_layer, image_layer, axes: str | None = None):
    """Inverse of :func:`voxels_of_points`: (z, y, x) voxels of the image as data of
    ``points_layer``."""
    axes = axes or default_axes(image_layer)
    data = points_from_voxels(zyx, image_layer, axes)
    world = data * np.asarray(image_layer.scale) + np.asarray(image_layer.translate)
    world = world[:, image_layer.ndim - points_layer.ndim :]
    return (world - np.asarray(points_layer.translate)) / np.asarray(points_layer.scale)


def world_units(layer) -> str | None:
    """The unit of the layer's last axis ("micrometer"), None when napari has none."""
    units = getattr(layer, "units", None)
    if not units:
        return None
    text = str(units[-1])
    return None if text in ("pixel", "dimensionless", "") else text


def set_points(layer, coords, features: dict) -> None:
    """Replace a Points layer's points and features in one go, colours refreshed."""
    coords = np.asarray(coords, float).reshape(-1, layer.ndim)
    layer.selected_data = set()
    layer.data = coords
    layer.features = pd.DataFrame(features)
    if "colormap" in (str(layer.face_color_mode), str(layer.border_color_mode)):
        layer.refresh_colors(update_color_mapping=False)
