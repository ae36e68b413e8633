"""Synthetic Emidec-like DE-MRI (LGE) short-axis phantom, written as an nnU-Net raw dataset.

Each case is a short-axis stack (6-10 slices of 10-13 mm, ~1.4 mm in-plane) through a thorax: body wall (fat,
muscle, ribs), dark lungs, mediastinum, spine, aorta, liver, stomach, and the heart: right ventricle, pericardial
fat, and a left ventricle whose cavity and myocardial wall taper towards the apex. Pathological cases carry a
bright infarct wedge (subendocardial to transmural) in one coronary territory, sometimes with a dark no-reflow core,
sized like Emidec's lesions (about a fifth of the wall at the median, ``realism.EMIDEC_LESION_EXTENT``).

The anatomy is described in millimetres in a canonical frame centred on the LV at its base (x: towards the
lateral wall, y: inferior, septum/RV towards -x, anterior wall towards -y). It is sampled with soft edges (voxel
partial volume), shifted in-plane slice by slice (breath-holds) and averaged over sub-slices (slice-thickness
partial volume), then blurred, textured and multiplied by a coil bias field. Labels are taken at voxel centres.

Intensities follow Emidec rather than a textbook LGE image: healthy myocardium is mid-grey (36-64 % of the 12-bit
range) and the contrasts are low, drawn per case in units of the remote myocardium's standard deviation (CNR, see
``nnunet_lefusion.realism``): blood pool 2.0-4.0, infarct -0.2 to +1.3 from the blood pool (1.8-5.0), no-reflow
0.5-1.3 below the infarct (0.8-2.9). Infarcts are patchy, and their enhancement fades over a few millimetres into the
healthy wall. Blood pool, infarct and no-reflow are rendered as enhancement maps over healthy myocardium whose
amplitudes are solved so that each region's median (noise included) lands on its drawn CNR; spatially correlated
Rician noise fills the myocardial standard deviation up to its drawn level (3-5 % of the median).

The surroundings are calibrated on real Emidec heart crops (the label box plus 16 voxels, ``realism.EMIDEC_CROP``):
healthy myocardium is one of the darker tissues there (median near the 36th percentile of the crop), because lung
is only a little darker than myocardium on Emidec's scale (0.85-1.0 x) and chest wall, mediastinum and liver are a
little brighter (1.02-1.3 x), epicardial fat (1.35-1.8 x) lies in patches rather than as a closed rim, and the right
ventricle's blood is as bright as the left's.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.realism import remote_myocardium

LABELS = {"background": 0, "cavity": 1, "myocardium": 2, "infarction": 3, "no_reflow": 4}
FOVS = ("thorax", "heart")
MAX_INTENSITY = 4095
DEFAULT_NAME = "LeFusionPhantom"
_SUB_SLICES = 5          # samples through the slice thickness
_MYOCARDIUM = 1.0        # healthy myocardium: the unit of every other signal level before 12-bit scaling
_TAU = 2.0 * np.pi
_MAX_SHIFT = 3.0         # mm: largest in-plane shift of a slice against the others
# coronary territories: probability, core wall angle (deg; 0 septal, 90 anterior, 180 lateral, 270 inferior),
# angular half-width (deg), long-axis position of the core (0 base, 1 apex)
_TERRITORIES = {"LAD": (0.45, (45, 110), (56, 119), (0.45, 0.75)),
                "LCx": (0.2, (165, 225), (49, 98), (0.2, 0.55)),
                "RCA": (0.35, (245, 300), (49, 105), (0.2, 0.5))}


@dataclass(frozen=True)
class PhantomCase:
    """One phantom volume: ``image`` (Z,Y,X) float32 in 0..4095, ``label`` (Z,Y,X) uint8, ``spacing`` (z,y,x) mm."""

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]


def _occ(sd: np.ndarray, h: float) -> np.ndarray:
    """Fraction of a voxel of width ``h`` inside a boundary at signed distance ``sd`` (negative inside)."""
    return np.clip(0.5 - sd / h, 0.0, 1.0)


def _ellipse_sd(dx: np.ndarray, dy: np.ndarray, a: float, b: float) -> np.ndarray:
    """Signed distance (mm) to an axis-aligned ellipse with semi-axes a, b, measured along the ray from its centre."""
    rho = np.hypot(dx, dy)
    q = np.hypot(dx / a, dy / b)
    return rho - (rho + 1e-6) / (q + 1e-6 / np.maximum(a, b))


def _paint(img: np.ndarray, alpha: np.ndarray, value) -> None:
    """Cover ``img`` in place with ``value`` where ``alpha`` is 1, mixing linearly in between."""
    img += alpha * (value - img)


def _bump(x: np.ndarray) -> np.ndarray:
    """Smooth profile: 1 at 0, falling to 0 at |x| = 1 and beyond."""
    return np.clip(1.0 - x * x, 0.0, None)


def _wrap(angle: np.ndarray) -> np.ndarray:
    """Angle difference wrapped to [-pi, pi)."""
    return (angle + np.pi) % _TAU - np.pi


class _Periodic:
    """A random smooth function of angle: a sum of cosines with random amplitudes and phases, tabulated."""

    def __init__(self, rng: np.random.Generator, max_amps: dict[int, float], samples: int = 720):
        self.angles = np.linspace(-np.pi, np.pi, samples, endpoint=False)
        self.values = sum(rng.uniform(0, amp) * np.cos(k * self.angles + rng.uniform(0, _TAU))
                          for k, amp in max_amps.items())

    def __call__(self, phi: np.ndarray) -> np.ndarray:
        return np.interp(phi, self.angles, self.values, period=_TAU)


@dataclass
class _Tissue:
    """Per-case signal levels relative to healthy myocardium (1.0), the lesion contrasts and the scanner level."""

    level: float          # median of healthy myocardium in the 12-bit image
    noise: float          # standard deviation of healthy myocardium relative to its median
    cnr_blood: float      # (median blood pool - median remote myocardium) / sd of the remote myocardium
    infarct_offset: float  # infarct CNR minus blood-pool CNR
    no_reflow_place: float  # where no-reflow's CNR lies in its allowed range (0 lowest, 1 highest)
    patchiness: float     # relative amplitude of the patchy infarct enhancement
    border: float         # width (mm, FWHM) over which lesion enhancement fades into the healthy wall
    blood: float
    rv_blood: float
    aorta: float
    lung: float
    fat: float
    muscle: float
    liver: float
    stomach: float
    marrow: float
    csf: float
    soft: float

    def cnrs(self) -> tuple[float, float, float]:
        """CNRs of blood pool, infarct and no-reflow."""
        infarct = float(np.clip(self.cnr_blood + self.infarct_offset, 1.8, 5.0))
        high = min(2.9, infarct - 0.5)
        low = min(max(0.8, infarct - 1.3), high)
        return self.cnr_blood, infarct, low + self.no_reflow_place * (high - low)

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "_Tissue":
        u = rng.uniform
        level, noise, cnr_blood = u(0.36, 0.64) * MAX_INTENSITY, u(0.03, 0.05), u(2.0, 4.0)
        blood = _MYOCARDIUM + cnr_blood * noise
        return cls(level=level, noise=noise, cnr_blood=cnr_blood, infarct_offset=u(-0.2, 1.3),
                   no_reflow_place=u(0.0, 1.0),
                   patchiness=u(0.4, 0.8),
                   border=u(4.0, 8.0), blood=blood, rv_blood=blood * u(0.95, 1.05), aorta=blood * u(0.9, 1.05),
                   lung=u(0.85, 1.0), fat=min(u(1.35, 1.8), 0.9 * MAX_INTENSITY / level), muscle=u(1.02, 1.18),
                   liver=u(1.1, 1.3), stomach=u(0.95, 1.25), marrow=u(1.1, 1.4), csf=u(0.7, 0.9), soft=u(1.05, 1.25))


@dataclass
class _Lesion:
    """An infarct in one coronary territory: depth (fraction of the wall) over wall angle and long-axis position."""

    centre: float        # wall angle of the core (rad): 0 septal, pi/2 anterior, pi lateral, 3pi/2 inferior
    half_width: float    # angular half-width (rad)
    u_centre: float      # long-axis position of the core (0 base, 1 apex)
    u_half: float        # long-axis half-length
    peak: float          # depth at the core; > 1 gives a transmural core
    skew: float          # drift of the centre angle along the long axis (rad per unit u)
    edge: _Periodic      # irregularity of the lateral borders
    mvo_peak: float      # no-reflow depth at the core (0: none)
    mvo_fraction: float  # no-reflow extent relative to the infarct's

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "_Lesion":
        territories = list(_TERRITORIES.values())
        _, centre, half, u_centre = territories[rng.choice(len(territories), p=[t[0] for t in territories])]
        peak = rng.uniform(0.6, 2.0)
        with_mvo = peak > 0.9 and rng.random() < 0.6
        return cls(centre=np.deg2rad(rng.uniform(*centre)), half_width=np.deg2rad(rng.uniform(*half)),
                   u_centre=rng.uniform(*u_centre), u_half=rng.uniform(0.3, 0.7), peak=peak,
                   skew=rng.uniform(-0.6, 0.6), edge=_Periodic(rng, {3: 0.12, 5: 0.12, 7: 0.12}),
                   mvo_peak=rng.uniform(0.6, 0.9) if with_mvo else 0.0, mvo_fraction=rng.uniform(0.25, 0.45))

    def depths(self, phi: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Infarct and no-reflow depths as fractions of the wall thickness (0 where absent)."""
        dphi = _wrap(phi - self.centre - self.skew * (u - self.u_centre)) / self.half_width
        du = (u - self.u_centre) / self.u_half
        infarct = self.peak * _bump(dphi * (1.0 + self.edge(phi))) * _bump(du)
        mvo = self.mvo_peak * _bump(dphi / self.mvo_fraction) * _bump(du / self.mvo_fraction)
        return np.clip(infarct, 0.0, 1.0), mvo


@dataclass
class _Heart:
    """LV (cavity, wall, lesion) and RV geometry in the canonical frame, in mm."""

    radius: float          # epicardial radius at the base
    wall: float            # wall thickness at the base
    length: float          # base-to-apex length of the epicardium
    apex_wall: float       # myocardium beyond the endocardial apex
    power: float           # long-axis profile exponent (2: half ellipsoid)
    drift: tuple[float, float]   # LV centre shift from base to apex
    endo_shape: _Periodic  # relative radius deviations of the endocardium
    epi_shape: _Periodic
    rv_size: tuple[float, float]  # RV semi-axes (x, y) at the base
    rv_lift: float         # RV centre towards anterior
    rv_end: float          # long-axis position where the RV ends
    rv_wall: float
    fat: float             # pericardial fat thickness scale
    fat_shape: _Periodic
    papillary: tuple[float, float, float]  # radius (mm), anterolateral and posteromedial angles
    lesion: _Lesion | None = None

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "_Heart":
        radius = rng.uniform(27.0, 35.0)
        return cls(radius=radius, wall=rng.uniform(7.0, 11.0), length=rng.uniform(70.0, 105.0),
                   apex_wall=rng.uniform(5.0, 9.0), power=rng.uniform(1.8, 2.6),
                   drift=(rng.normal(0, 4.0), rng.normal(0, 4.0)),
                   endo_shape=_Periodic(rng, {2: 0.07, 3: 0.05, 9: 0.015, 13: 0.015}),
                   epi_shape=_Periodic(rng, {1: 0.04, 2: 0.05, 3: 0.03}),
                   rv_size=(radius * rng.uniform(0.6, 0.85), radius * rng.uniform(1.1, 1.4)),
                   rv_lift=radius * rng.uniform(0.0, 0.25), rv_end=rng.uniform(0.75, 0.95),
                   rv_wall=rng.uniform(2.0, 3.5), fat=rng.uniform(1.0, 4.0),
                   fat_shape=_Periodic(rng, {1: 0.8, 2: 0.6, 4: 0.4}),
                   papillary=(rng.uniform(1.5, 3.5), np.deg2rad(rng.uniform(120, 150)),
                              np.deg2rad(rng.uniform(220, 255))))

    @property
    def extent(self) -> float:
        """Radius (mm) around the base LV centre that holds the whole heart at every slice."""
        fat = 1.5 * self.fat * (1.0 + self.fat_shape.values.max())
        lv = self.radius * (1.0 + self.epi_shape.values.max()) + fat
        rv = np.hypot(0.3 * self.radius + 0.7 * self.rv_size[0], self.rv_lift) + self.rv_size[1] + self.rv_wall + fat
        return max(lv, rv) + 1.2 * np.hypot(*self.drift) + 3.0

    def _profile(self, u: np.ndarray, length: float) -> np.ndarray:
        """Radius scale along the long axis: 1 at the base, 0 at ``length``."""
        t = np.clip(u * self.length / length, 0.0, 1.0)
        return (1.0 - t ** self.power) ** (1.0 / self.power)

    def fields(self, xc: np.ndarray, yc: np.ndarray, u: np.ndarray, h: float) -> dict[str, np.ndarray]:
        """Polar coordinates about the LV centre and the nested boundary radii (endo <= mvo <= mi <= epi)."""
        px, py = xc - self.drift[0] * u, yc - self.drift[1] * u
        rho = np.hypot(px, py)
        phi = np.arctan2(-py, -px)
        epi_scale = self.radius * self._profile(u, self.length)
        r_epi = epi_scale * (1.0 + self.epi_shape(phi))
        r_endo = (self.radius - self.wall) * self._profile(u, self.length - self.apex_wall) \
            * (1.0 + self.endo_shape(phi))
        r_endo = np.clip(np.minimum(r_endo, r_epi - 0.4 * self.wall), 0.0, None)
        r_mi = r_mvo = r_endo
        if self.lesion is not None:
            wall = r_epi - r_endo
            d_mi, d_mvo = self.lesion.depths(phi, u)
            r_mi = r_endo + d_mi * wall
            r_mvo = r_endo + np.clip(np.minimum(d_mvo * wall, d_mi * wall - 2.0 * h), 0.0, None)
        return {"px": px, "py": py, "rho": rho, "phi": phi, "u": u, "epi_scale": epi_scale,
                "epi": r_epi, "mi": r_mi, "mvo": r_mvo, "endo": r_endo}

    def label(self, f: dict[str, np.ndarray]) -> np.ndarray:
        """Emidec labels at the sample points."""
        rho = f["rho"]
        lab = np.zeros(rho.shape, np.uint8)
        lab[rho < f["epi"]] = 2
        lab[rho < f["mi"]] = 3
        lab[rho < f["mvo"]] = 4
        lab[rho < f["endo"]] = 1
        return lab

    def paint(self, img: np.ndarray, f: dict[str, np.ndarray], t: _Tissue, h: float) -> None:
        """Paint pericardial fat, RV and the LV over ``img`` in place; the LV all as healthy myocardium (its blood
        pool and lesions are the enhancement maps)."""
        rho, phi, u = f["rho"], f["phi"], f["u"]
        rv_scale = np.sqrt(np.clip(1.0 - (u / self.rv_end) ** 2, 0.0, 1.0))
        a, b = self.rv_size[0] * rv_scale + 1e-3, self.rv_size[1] * rv_scale + 1e-3
        dx = f["px"] + 0.3 * f["epi_scale"] + 0.7 * a
        dy = f["py"] + self.rv_lift
        rv_sd = _ellipse_sd(dx, dy, a, b)
        fat_width = self.fat * np.clip(0.2 + self.fat_shape(phi), 0.0, None) * (1.5 - 0.5 * u)
        fat = np.maximum(_occ(rho - f["epi"] - fat_width, h), _occ(rv_sd - self.rv_wall - fat_width, h))
        _paint(img, fat * (f["epi_scale"] > 0), t.fat)
        _paint(img, _occ(rv_sd - self.rv_wall, h), _MYOCARDIUM)
        _paint(img, _occ(rv_sd, h), t.rv_blood)
        _paint(img, _occ(rho - f["epi"], h), _MYOCARDIUM)

    def enhancement_maps(self, f: dict[str, np.ndarray], patches: np.ndarray, t: _Tissue,
                         h: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where the LV blood pool (papillary muscles spared), infarct and no-reflow are brighter than healthy
        myocardium (0..1, infarct scaled by ``patches``); the lesions blurred in-plane within the wall by the
        tissue's border width, so that their enhancement fades into healthy myocardium."""
        occ = {k: _occ(f["rho"] - f[k], h) for k in ("epi", "mi", "mvo", "endo")}
        blood = occ["endo"].copy()
        pap_r, *pap_angles = self.papillary
        size = pap_r * np.clip(f["endo"].max(axis=(-2, -1), keepdims=True) / (3.0 * pap_r) - 0.5, 0.0, 1.0)
        dist = 0.55 * (self.radius - self.wall) * self._profile(f["u"], self.length - self.apex_wall)
        for angle in pap_angles:
            blood *= 1.0 - _occ(np.hypot(f["px"] + dist * np.cos(angle), f["py"] + dist * np.sin(angle)) - size, h)
        wall = occ["epi"] - occ["endo"]
        sigma = (0,) * (wall.ndim - 2) + (t.border / 2.355 / h,) * 2
        smooth_wall = ndimage.gaussian_filter(wall, sigma) + 1e-6
        maps = [(occ["mi"] - occ["mvo"]) * patches, occ["mvo"] - occ["endo"]]
        infarct, no_reflow = (ndimage.gaussian_filter(m * wall, sigma) / smooth_wall * wall for m in maps)
        return blood, infarct, no_reflow


@dataclass
class _Thorax:
    """Body wall, lungs, mediastinum, spine, aorta, liver and stomach in the canonical frame, in mm."""

    body: tuple[float, float, float, float]   # centre x, y and semi-axes
    body_shape: _Periodic
    fat: float             # subcutaneous fat thickness scale
    muscle: float          # chest wall muscle thickness scale
    layer_shape: _Periodic  # relative variation of both layers around the body
    back: float            # extra posterior muscle
    ribs: list[tuple[float, float, float]]
    mediastinum: tuple[float, float, float, float]
    spine: tuple[float, float, float]
    aorta: tuple[float, float, float]
    liver: tuple[float, float, float, float, float]   # centre x, y, semi-axes, rise towards apex
    stomach: tuple[float, float, float, float, float]

    @classmethod
    def sample(cls, rng: np.random.Generator, heart: _Heart) -> "_Thorax":
        a, b = rng.uniform(140, 180), rng.uniform(100, 130)
        fat, muscle, back = rng.uniform(4, 16), rng.uniform(7, 14), rng.uniform(10, 25)
        inner_a, inner_b = a - fat - muscle, b - fat - muscle - back / 2
        bx = -rng.uniform(20, 45)
        gap = heart.radius + rng.uniform(12, 30)
        inner_y = inner_b * np.sqrt(1 - (bx / inner_a) ** 2) - gap   # anterior inner wall at y = -gap above the LV
        by = inner_y + back / 2
        spine_r = rng.uniform(14, 19)
        sx, sy = bx + rng.normal(0, 5), by + b - fat - muscle - back + 0.3 * spine_r
        ribs = [(bx + (a - fat - muscle / 2) * np.cos(angle), by + (b - fat - muscle / 2) * np.sin(angle),
                 rng.uniform(4, 7)) for angle in rng.uniform(-0.9 * np.pi, 0.4 * np.pi, size=rng.integers(4, 8))]
        med = (0.5 * sx + rng.normal(0, 5), 0.45 * sy, heart.radius + rng.uniform(12, 25), 0.55 * sy + 10)
        aorta = (sx + rng.uniform(18, 30), sy - spine_r - rng.uniform(0, 10), rng.uniform(9, 14))
        liver = (bx - rng.uniform(10, 50), heart.radius + rng.uniform(45, 75), rng.uniform(55, 85),
                 rng.uniform(35, 60), rng.uniform(10, 45))
        stomach = (rng.uniform(20, 60), heart.radius + rng.uniform(50, 80), rng.uniform(25, 45),
                   rng.uniform(20, 35), rng.uniform(0, 40))
        return cls(body=(bx, by, a, b), body_shape=_Periodic(rng, {2: 0.04, 3: 0.03}), fat=fat, muscle=muscle,
                   layer_shape=_Periodic(rng, {1: 0.4, 2: 0.3, 3: 0.2}),
                   back=back, ribs=ribs, mediastinum=med, spine=(sx, sy, spine_r), aorta=aorta, liver=liver,
                   stomach=stomach)

    def render(self, xc: np.ndarray, yc: np.ndarray, u: np.ndarray, t: _Tissue, h: float) -> np.ndarray:
        """Signal of the thorax without the heart: (nz, ny, nx) for coordinates (nz, ny, nx), u (nz, 1, 1)."""
        img = np.zeros(xc.shape)
        bx, by, a, b = self.body
        dx, dy = xc - bx, yc - by
        theta = np.arctan2(dy, dx)
        wobble = 1.0 + self.body_shape(theta)
        dx, dy = dx / wobble, dy / wobble
        layer = np.clip(1.0 + self.layer_shape(theta) - 0.3 * np.sin(theta), 0.3, None)
        fat = self.fat * layer
        _paint(img, _occ(_ellipse_sd(dx, dy, a, b), h), t.fat)
        _paint(img, _occ(_ellipse_sd(dx, dy, a - fat, b - fat), h), t.muscle)
        for rx, ry, rr in self.ribs:
            _paint(img, _occ(np.hypot(xc - rx, yc - ry) - rr, h), t.marrow)
        wall = fat + self.muscle * layer
        inner = _occ(_ellipse_sd(dx, dy + self.back / 2, a - wall, b - wall - self.back / 2), h)
        _paint(img, inner, t.lung)
        mx, my, ma, mb = self.mediastinum
        _paint(img, _occ(_ellipse_sd(xc - mx, yc - my, ma, mb), h) * inner, t.soft)
        sx, sy, sr = self.spine
        _paint(img, _occ(np.hypot(xc - sx, yc - sy) - sr, h), t.marrow)
        _paint(img, _occ(np.hypot(xc - sx, yc - sy - sr - 6.0) - 6.0, h), t.csf)
        ax, ay, ar = self.aorta
        _paint(img, _occ(np.hypot(xc - ax, yc - ay) - ar, h), t.aorta)
        for (ox, oy, oa, ob, rise), value in ((self.stomach, t.stomach), (self.liver, t.liver)):
            _paint(img, _occ(_ellipse_sd(xc - ox, yc - oy + rise * u, oa, ob), h) * inner, value)
        return img


@dataclass
class _Grid:
    """Voxel grid: shape (nz, ny, nx), spacing (z, y, x) and where it lies in the canonical frame."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    u_first: float          # long-axis position of the first slice centre
    centre: tuple[float, float]   # FOV centre relative to the base LV centre, image axes (x, y), mm
    angle: float            # in-plane rotation of the anatomy
    transpose: bool         # swapped in-plane axes (orientation differs between Emidec cases)
    shifts: np.ndarray      # (nz, 2) in-plane shift (mm) of each slice: breath-holds differ

    @classmethod
    def sample(cls, rng: np.random.Generator, heart: _Heart, thorax: _Thorax, fov: str) -> "_Grid":
        dz = float(np.float32(round(rng.uniform(10.0, 13.0), 1)))
        s = float(np.float32(round(rng.uniform(1.35, 1.5), 3)))
        nz = int(np.clip(round(heart.length * rng.uniform(0.8, 1.0) / dz) + 1, 6, 10))
        if fov == "heart":
            ny, nx = (int(v) for v in rng.integers(64, 81, size=2))
            centre = tuple(rng.uniform(-6, 6, size=2))
        else:
            sizes = [int(rng.integers(230, 261)), int(rng.integers(140, 261))]
            ny, nx = sizes[::-1] if rng.random() < 0.5 else sizes
            towards_body = rng.uniform(0.0, 0.35) * np.array(thorax.body[:2]) + rng.normal(0, 8, size=2)
            limit = np.array([nx, ny]) * s / 2 - heart.extent
            centre = tuple(np.clip(towards_body, -np.maximum(limit, 0), np.maximum(limit, 0)))
        return cls(shape=(nz, ny, nx), spacing=(dz, s, s), u_first=rng.uniform(0.0, 0.1),
                   centre=(float(centre[0]), float(centre[1])), angle=rng.uniform(-0.35, 0.35),
                   transpose=bool(rng.random() < 0.25),
                   shifts=np.clip(rng.normal(0.0, rng.uniform(0.5, 1.5), size=(nz, 2)), -_MAX_SHIFT, _MAX_SHIFT))

    def slice_u(self, length: float, offsets: np.ndarray) -> np.ndarray:
        """Long-axis positions of slice centres (plus ``offsets`` in slice thicknesses), shape (nz, len(offsets))."""
        k = np.arange(self.shape[0])[:, None] + offsets[None, :]
        return self.u_first + k * self.spacing[0] / length

    def canonical(self, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        """Canonical (x, y) mm of the voxel centres in a window of the grid, each slice shifted: (nz, rows, cols)."""
        _, ny, nx = self.shape
        s = self.spacing[2]
        x = (np.arange(nx)[cols] - (nx - 1) / 2) * s + self.centre[0]
        y = (np.arange(ny)[rows] - (ny - 1) / 2) * s + self.centre[1]
        x, y = np.meshgrid(x, y)
        x, y = x + self.shifts[:, :1, None], y + self.shifts[:, 1:, None]
        c, si = np.cos(self.angle), np.sin(self.angle)
        xc, yc = c * x + si * y, -si * x + c * y
        return (yc, xc) if self.transpose else (xc, yc)

    def heart_window(self, extent: float) -> tuple[slice, slice]:
        """Rows and columns of the grid within ``extent`` mm of the base LV centre."""
        _, ny, nx = self.shape
        s = self.spacing[2]
        half = int(np.ceil((extent + _MAX_SHIFT) / s))
        ci = int(round((nx - 1) / 2 - self.centre[0] / s))
        cj = int(round((ny - 1) / 2 - self.centre[1] / s))
        return slice(max(cj - half, 0), min(cj + half + 1, ny)), slice(max(ci - half, 0), min(ci + half + 1, nx))


def _has_lesion(label: np.ndarray, lesion: _Lesion) -> bool:
    """Whether a drawn lesion shows in the labels: >= 30 infarct voxels, and no-reflow where some was drawn."""
    return np.count_nonzero(label == 3) >= 30 and (lesion.mvo_peak == 0 or bool((label == 4).any()))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma) -> np.ndarray:
    """Gaussian-filtered white noise, rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / field.std()


def _rician(signal: np.ndarray, sd: float, noise: np.ndarray) -> np.ndarray:
    """Magnitude of ``signal`` plus complex noise of standard deviation ``sd`` (``noise``: two unit fields)."""
    return np.hypot(signal + sd * noise[0], sd * noise[1])


def _solve_median(base: np.ndarray, gain: np.ndarray, sd: float, noise: np.ndarray, target: float) -> float:
    """The amplitude ``a`` for which the median of ``base + a * gain`` with its noise equals ``target``."""
    def excess(a: float) -> float:
        return float(np.median(_rician(base + a * gain, sd, noise))) - target

    step = (target - float(np.median(base))) / max(float(np.median(gain)), 0.05)
    low, high = min(0.0, 2 * step), max(0.0, 2 * step)
    for _ in range(60):
        if excess(low) <= 0 <= excess(high):
            break
        low, high = 2 * low - high, 2 * high - low
    for _ in range(40):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if excess(middle) < 0 else (low, middle)
    return 0.5 * (low + high)


def _contrast(img: np.ndarray, maps: np.ndarray, noise: np.ndarray, label: np.ndarray,
              spacing: tuple[float, float, float], tissue: _Tissue) -> np.ndarray:
    """The noisy image, with the enhancement maps (blood pool, infarct, no-reflow) at the amplitudes that give the
    case's CNRs.

    ``noise`` (two unit-sd fields) is scaled so that the remote myocardium's sd is ``tissue.noise`` of its median
    (at least 40 % of that sd is noise); the medians are solved with that very noise.
    """
    remote, amplitudes = remote_myocardium(label, spacing, (2,), (3, 4)), np.zeros(len(maps))
    for _ in range(3):
        clean = img + np.tensordot(amplitudes, maps, 1)
        level, spread = float(np.median(clean[remote])), float(clean[remote].std())
        sd = max(np.sqrt(max((tissue.noise * level) ** 2 - spread ** 2, 0.0)), 0.4 * tissue.noise * level)
        noisy = _rician(clean, sd, noise)
        level, scale = float(np.median(noisy[remote])), float(noisy[remote].std())
        for k, (lab, cnr) in enumerate(zip((1, 3, 4), tissue.cnrs())):
            region = label == lab
            if region.any():
                others = img[region] + np.tensordot(amplitudes, maps[:, region], 1) - amplitudes[k] * maps[k][region]
                amplitudes[k] = _solve_median(others, maps[k][region], sd, noise[:, region], level + cnr * scale)
    return _rician(img + np.tensordot(amplitudes, maps, 1), sd, noise)


def _finish(rng: np.random.Generator, img: np.ndarray, maps: np.ndarray, tissue: _Tissue, grid: _Grid,
            fov: str, label: np.ndarray, xc: np.ndarray, yc: np.ndarray) -> np.ndarray:
    """Scanner effects (blur, texture, coil bias), LV contrast, correlated Rician noise, 12-bit level."""
    nz, ny, nx = grid.shape
    s = grid.spacing[2]
    psf = (0, rng.uniform(0.25, 0.5), rng.uniform(0.25, 0.5))
    texture = 1.0 + rng.uniform(0.01, 0.03) * _smooth_noise(rng, grid.shape, (0, 3, 3))
    coil = np.array([rng.uniform(-60, 60), -rng.uniform(60, 120)])
    gradient = rng.uniform(-0.15, 0.15, size=3)
    bias = (gradient[0] * xc + gradient[1] * yc) / 100.0 + rng.uniform(0.1, 0.4) * np.exp(
        -((xc - coil[0]) ** 2 + (yc - coil[1]) ** 2) / (2 * 120.0 ** 2))
    scanner = texture * np.exp(bias + gradient[2] * np.linspace(-0.5, 0.5, nz)[:, None, None])
    correlation = (0, *rng.uniform(0.5, 0.9, size=2))
    noise = np.stack([_smooth_noise(rng, grid.shape, correlation) for _ in range(2)])
    img = _contrast(ndimage.gaussian_filter(img, psf) * scanner, ndimage.gaussian_filter(maps, (0, *psf)) * scanner,
                    noise, label, grid.spacing, tissue)
    img *= tissue.level / np.median(img[remote_myocardium(label, grid.spacing, (2,), (3, 4))])
    if fov == "thorax" and rng.random() < 0.3:
        rows, cols = np.nonzero(label.any(axis=0))
        side = int(rng.integers(4))
        room = [rows.min(), ny - 1 - rows.max(), cols.min(), nx - 1 - cols.max()][side] - int(8 / s)
        width = min(int(rng.uniform(0.04, 0.15) * (ny if side < 2 else nx)), room)
        if width > 0:
            band = [np.s_[:, :width], np.s_[:, ny - width:], np.s_[:, :, :width], np.s_[:, :, nx - width:]][side]
            img[band] = 0.0
    return np.clip(np.rint(img), 0, MAX_INTENSITY).astype(np.float32)


def generate_case(rng: np.random.Generator, pathological: bool, fov: str = "thorax") -> PhantomCase:
    """Draw one phantom case; pathological cases have an infarct (and sometimes no-reflow), normal ones none."""
    if fov not in FOVS:
        raise LeFusionError(f"unknown field of view {fov!r}; choose one of {', '.join(FOVS)}")
    heart = _Heart.sample(rng)
    thorax = _Thorax.sample(rng, heart)
    tissue = _Tissue.sample(rng)
    grid = _Grid.sample(rng, heart, thorax, fov)
    h = grid.spacing[2]
    rows, cols = grid.heart_window(heart.extent)
    xb, yb = grid.canonical(rows, cols)
    u_centre = grid.slice_u(heart.length, np.zeros(1))[..., None]
    for _ in range(100):
        heart.lesion = _Lesion.sample(rng) if pathological else None
        box_label = heart.label(heart.fields(xb, yb, u_centre, h))
        if heart.lesion is None or _has_lesion(box_label, heart.lesion):
            break
    else:
        raise RuntimeError("could not place an infarct in the phantom heart")
    label = np.zeros(grid.shape, np.uint8)
    label[:, rows, cols] = box_label

    xc, yc = grid.canonical(slice(None), slice(None))
    img = thorax.render(xc, yc, u_centre, tissue, h)
    offsets = (np.arange(_SUB_SLICES) + 0.5) / _SUB_SLICES - 0.5
    fields = heart.fields(xb[:, None], yb[:, None], grid.slice_u(heart.length, offsets)[..., None, None], h)
    sub = np.repeat(img[:, None, rows, cols], _SUB_SLICES, axis=1)
    heart.paint(sub, fields, tissue, h)
    img[:, rows, cols] = sub.mean(axis=1)
    box = (grid.shape[0], 1, *xb.shape[1:])
    patches = np.clip(1.0 + tissue.patchiness * _smooth_noise(rng, box, (0, 0, 1.5, 1.5)), 0.2, None)
    maps = np.zeros((3, *grid.shape))
    for k, enhancement in enumerate(heart.enhancement_maps(fields, patches, tissue, h)):
        maps[k][:, rows, cols] = enhancement.mean(axis=1)
    image = _finish(rng, img, maps, tissue, grid, fov, label, xc, yc)
    return PhantomCase(image=image, label=label, spacing=grid.spacing)


def case_plan(num_cases: int, normal_fraction: float = 1 / 3) -> list[tuple[str, bool]]:
    """Emidec-style case names with their kind: ``Case_P001``... pathological first, then ``Case_N001``... normal."""
    normal = int(round(num_cases * normal_fraction))
    return ([(f"Case_P{i:03d}", True) for i in range(1, num_cases - normal + 1)]
            + [(f"Case_N{i:03d}", False) for i in range(1, normal + 1)])


def case_rng(seed: int, name: str) -> np.random.Generator:
    """The random generator of one case: depends only on the seed and the case name."""
    return np.random.default_rng([seed, *name.encode()])


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary name in ``path``'s folder, then rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{''.join(path.suffixes)}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_nifti(array: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(v) for v in spacing[::-1]))
    _write_atomic(path, lambda tmp: sitk.WriteImage(image, str(tmp), True))


def _validate(dataset_id: int, num_cases: int, seed: int, name: str, fov: str, normal_fraction: float) -> None:
    if not 1 <= dataset_id <= 999:
        raise LeFusionError(f"dataset id must be between 1 and 999, got {dataset_id}")
    if num_cases < 2:
        raise LeFusionError(f"need at least 2 cases for nnU-Net, got {num_cases}")
    if seed < 0:
        raise LeFusionError(f"seed must be >= 0, got {seed}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise LeFusionError(f"dataset name {name!r} must be letters, digits, '_' or '-'")
    if fov not in FOVS:
        raise LeFusionError(f"unknown field of view {fov!r}; choose one of {', '.join(FOVS)}")
    if not 0.0 <= normal_fraction <= 1.0:
        raise LeFusionError(f"normal fraction must be between 0 and 1, got {normal_fraction}")


def write_dataset(dataset_id: int, num_cases: int, seed: int, raw_root: str | Path, name: str = DEFAULT_NAME,
                  fov: str = "thorax", normal_fraction: float = 1 / 3, overwrite: bool = False) -> Path:
    """Write ``Dataset{id:03d}_{name}`` (imagesTr, labelsTr, dataset.json last) under ``raw_root``; return it.

    Refuses (``LeFusionError``) if a dataset with the same id exists, unless ``overwrite`` (which removes it).
    """
    _validate(dataset_id, num_cases, seed, name, fov, normal_fraction)
    raw_root = Path(raw_root)
    existing = sorted(p for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir())
    if existing and not overwrite:
        raise LeFusionError(f"dataset id {dataset_id} is already used by {existing[0]}; pass --overwrite to replace it")
    for path in existing:
        shutil.rmtree(path)
    folder = raw_root / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    plan = case_plan(num_cases, normal_fraction)
    for case_name, pathological in tqdm(plan, desc=f"phantom {folder.name}", unit="case"):
        case = generate_case(case_rng(seed, case_name), pathological, fov)
        _write_nifti(case.image.astype(np.int16), case.spacing, folder / "imagesTr" / f"{case_name}_0000.nii.gz")
        _write_nifti(case.label, case.spacing, folder / "labelsTr" / f"{case_name}.nii.gz")
    meta = {"channel_names": {"0": "LGE"}, "labels": LABELS, "numTraining": num_cases, "file_ending": ".nii.gz",
            "name": folder.name, "description": "Synthetic Emidec-like DE-MRI phantom (nnunet-lefusion)",
            "lefusion_phantom": {"seed": seed, "fov": fov, "normal_fraction": normal_fraction,
                                 "pathological": sum(p for _, p in plan)}}
    _write_atomic(folder / "dataset.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    return folder
