"""Synthetic chest-radiograph DICOM dataset for the offline demo and for tests.

The demo must run with no network and no data outside the project, yet exercise the same code
paths as a hospital export: several transfer syntaxes, both MONOCHROME polarities, rescale and
window tags, two scanners with different intensity responses, and PHI-shaped identifiers that the
rest of the toolkit must prove it never leaks. Everything is drawn from one seeded generator, so a
seed names a dataset byte for byte.

This module deliberately imports neither TensorFlow nor Keras: it runs in decode workers and in
tests that must stay light.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

LABELS = ("normal", "finding")
ENCODINGS: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
    JPEGLSLossless,
)
POLARITIES = ("MONOCHROME2", "MONOCHROME1")
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_STUDY_EPOCH = dt.date(2024, 1, 1)


@dataclass(frozen=True)
class Site:
    """One simulated scanner: how display intensity becomes stored values and tags.

    Stored value = low + (high - low) * display**gamma + noise, so after the Modality LUT and the
    window below, site_b shows a different tone curve and noise level than site_a: a domain shift
    like a second vendor's, not a label cue.
    """

    name: str
    size: int
    bits_stored: int
    gamma: float
    noise_sd: float
    rescale_slope: float
    rescale_intercept: float
    stored_low: int
    stored_high: int
    pixel_spacing_mm: float
    manufacturer: str
    model: str
    institution: str

    @property
    def max_stored(self) -> int:
        return 2**self.bits_stored - 1

    def window(self, polarity: str) -> tuple[float, float]:
        """(center, width) in modality units spanning [stored_low, stored_high].

        MONOCHROME1 stores max_stored - v; the centre is mirrored (with the +1 the LINEAR
        formula of PS3.3 C.11.2.1.2 implies) so that windowing then inverting gives exactly the
        MONOCHROME2 picture.
        """
        slope, intercept = self.rescale_slope, self.rescale_intercept
        center = slope * (self.stored_low + self.stored_high) / 2 + intercept
        width = slope * (self.stored_high - self.stored_low)
        if polarity == "MONOCHROME1":
            center = slope * self.max_stored + 2 * intercept + 1 - center
        return center, width


SITES = (
    Site(
        name="site_a",
        size=224,
        bits_stored=12,
        gamma=1.0,
        noise_sd=0.012,
        rescale_slope=1.0,
        rescale_intercept=0.0,
        stored_low=200,
        stored_high=3900,
        pixel_spacing_mm=1.8,
        manufacturer="Synthetica Medical",
        model="SynthRad DR-12",
        institution="SYNTHETIC GENERAL HOSPITAL A",
    ),
    Site(
        name="site_b",
        size=256,
        bits_stored=14,
        gamma=0.8,
        noise_sd=0.025,
        rescale_slope=0.5,
        rescale_intercept=-2048.0,
        stored_low=1000,
        stored_high=15500,
        pixel_spacing_mm=1.6,
        manufacturer="Phantom Imaging Systems",
        model="PIS Xpose 14",
        institution="SYNTHETIC UNIVERSITY CLINIC B",
    ),
)


@dataclass(frozen=True)
class Anatomy:
    """Per-patient body shape in normalised coordinates (x right, y down, both in [-1, 1])."""

    lung_cx: float
    lung_cy: float
    lung_ax: float
    lung_ay: float
    body_ax: float
    heart_ax: float
    heart_ay: float
    rib_period: float
    rib_phase: float
    body_density: float
    lung_lucency: float


@dataclass(frozen=True)
class Pose:
    """Per-image patient positioning, so a patient's images are not pixel-identical."""

    dx: float
    dy: float
    zoom: float

    def to_image(self, x: float, y: float) -> tuple[float, float]:
        return x * self.zoom + self.dx, y * self.zoom + self.dy


@dataclass(frozen=True)
class Nodule:
    """A finding in normalised image coordinates; radius is a fraction of the image width."""

    x: float
    y: float
    radius: float
    contrast: float

    def in_pixels(self, size: int) -> tuple[float, float, float]:
        """(row, col, radius) in pixels of a size x size image: where tests look for it."""
        return (self.y + 1) * size / 2 - 0.5, (self.x + 1) * size / 2 - 0.5, self.radius * size


@dataclass(frozen=True)
class ImagePlan:
    """Everything needed to render and encode one file; rendering adds only seeded noise."""

    site: Site
    patient_number: int
    image_number: int
    label: str
    encoding: UID
    polarity: str
    anatomy: Anatomy
    pose: Pose
    nodule: Nodule | None
    study_date: dt.date
    birth_date: dt.date
    sex: str
    pixel_seed: int

    @property
    def patient_id(self) -> str:
        return f"QS-{self.patient_number:04d}"

    @property
    def relative_path(self) -> str:
        # Folders are numbered, not named by PatientID: the demo's outputs quote file paths, and
        # the only PHI-shaped values should be the ones inside the DICOM headers.
        return f"dicom/{self.site.name}/case{self.patient_number:04d}/{self.image_number}.dcm"


def generate_dicom_dataset(
    out_dir: str | Path, *, n_patients: int = 120, images_per_patient: int = 2, seed: int = 0
) -> Path:
    """Writes out_dir/dicom/<site>/<patient>/<n>.dcm and out_dir/manifest.csv; returns the latter.

    The manifest carries only path, label, patient_id and site, so nothing but `label` reveals
    the class; nodule geometry stays in the private plan (`_plan_dataset`) for tests.
    """
    out_dir = Path(out_dir)
    rows = []
    for plan in _plan_dataset(n_patients, images_per_patient, seed):
        path = out_dir / plan.relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = _stored_values(_render_display(plan), plan.site, plan.pixel_seed)
        _to_dataset(plan, stored, seed).save_as(path, enforce_file_format=True)
        rows.append(
            {
                "path": plan.relative_path,
                "label": plan.label,
                "patient_id": plan.patient_id,
                "site": plan.site.name,
            }
        )
    manifest = out_dir / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False, lineterminator="\n")
    return manifest


def _plan_dataset(n_patients: int, images_per_patient: int, seed: int) -> list[ImagePlan]:
    """Draws every random choice up front so tests can recover nodule positions from the seed.

    Patients are split evenly between sites with labels balanced inside each site, then shuffled
    before numbering, so neither site nor PatientID order predicts the label. Encodings and
    polarities are dealt round-robin over all images and shuffled, independent of the label.
    """
    if n_patients < 4 or images_per_patient < 1:
        raise ValueError("need n_patients >= 4 and images_per_patient >= 1")
    rng = np.random.default_rng(seed)
    # (site, label) pairs cycle a-normal, b-normal, a-finding, b-finding: balanced per site.
    slots = [(SITES[i % 2], LABELS[(i // 2) % 2]) for i in range(n_patients)]
    slots = [slots[i] for i in rng.permutation(n_patients)]
    n_images = n_patients * images_per_patient
    encodings = rng.permutation(np.resize(np.arange(len(ENCODINGS)), n_images))
    polarities = rng.permutation(np.resize(np.arange(len(POLARITIES)), n_images))

    plans = []
    for p, (site, label) in enumerate(slots):
        anatomy = _draw_anatomy(rng)
        study_date = _STUDY_EPOCH + dt.timedelta(days=int(rng.integers(0, 365)))
        birth_date = dt.date(int(rng.integers(1940, 2000)), int(rng.integers(1, 13)), 1)
        sex = str(rng.choice(["F", "M"]))
        for n in range(images_per_patient):
            k = p * images_per_patient + n
            pose = Pose(
                dx=rng.uniform(-0.03, 0.03),
                dy=rng.uniform(-0.03, 0.03),
                zoom=rng.uniform(0.96, 1.04),
            )
            nodule = _draw_nodule(rng, anatomy, pose) if label == "finding" else None
            plans.append(
                ImagePlan(
                    site=site,
                    patient_number=p + 1,
                    image_number=n + 1,
                    label=label,
                    encoding=ENCODINGS[encodings[k]],
                    polarity=POLARITIES[polarities[k]],
                    anatomy=anatomy,
                    pose=pose,
                    nodule=nodule,
                    study_date=study_date,
                    birth_date=birth_date,
                    sex=sex,
                    pixel_seed=int(rng.integers(2**63)),
                )
            )
    return plans


def _draw_anatomy(rng: np.random.Generator) -> Anatomy:
    return Anatomy(
        lung_cx=rng.uniform(0.38, 0.44),
        lung_cy=rng.uniform(-0.10, 0.0),
        lung_ax=rng.uniform(0.26, 0.31),
        lung_ay=rng.uniform(0.50, 0.60),
        body_ax=rng.uniform(0.82, 0.92),
        heart_ax=rng.uniform(0.22, 0.30),
        heart_ay=rng.uniform(0.20, 0.28),
        rib_period=rng.uniform(0.16, 0.20),
        rib_phase=rng.uniform(0.0, 1.0),
        body_density=rng.uniform(0.45, 0.55),
        lung_lucency=rng.uniform(0.20, 0.40),
    )


def _draw_nodule(rng: np.random.Generator, anatomy: Anatomy, pose: Pose) -> Nodule:
    """Places the nodule centre well inside a randomly chosen lung (at most 55% of its radius)."""
    side = rng.choice([-1.0, 1.0])
    rho, angle = 0.55 * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
    x = side * anatomy.lung_cx + rho * np.cos(angle) * anatomy.lung_ax
    y = anatomy.lung_cy + rho * np.sin(angle) * anatomy.lung_ay
    x, y = pose.to_image(x, y)
    return Nodule(x=x, y=y, radius=rng.uniform(0.06, 0.12), contrast=rng.uniform(0.35, 0.45))


def _render_display(plan: ImagePlan) -> np.ndarray:
    """Renders the displayed image (float in [0, 1], bright = dense) that every file must show."""
    rng = np.random.default_rng(plan.pixel_seed)
    size, a, pose = plan.site.size, plan.anatomy, plan.pose
    xi, yi = _image_grid(size)
    x, y = (xi - pose.dx) / pose.zoom, (yi - pose.dy) / pose.zoom  # anatomical coordinates

    body = _soft_ellipse(x, y, 0.0, 0.15, a.body_ax, 1.05, edge=0.04)
    lungs = np.maximum(
        _soft_ellipse(x, y, -a.lung_cx, a.lung_cy, a.lung_ax, a.lung_ay, edge=0.06),
        _soft_ellipse(x, y, a.lung_cx, a.lung_cy, a.lung_ax, a.lung_ay, edge=0.06),
    )
    heart = _soft_ellipse(x, y, 0.12, 0.30, a.heart_ax, a.heart_ay, edge=0.10)
    spine = np.exp(-((x / 0.07) ** 4)) * body
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * ((y - 0.6 * x**2) / a.rib_period + a.rib_phase))) ** 6

    image = 0.05 + a.body_density * body - a.lung_lucency * lungs + 0.15 * heart + 0.12 * spine
    image += lungs * (0.06 * ribs + _vessels(x, y, a, rng))
    image += body * _low_frequency_texture(xi, yi, rng)
    if plan.nodule is not None:
        image += _nodule(xi, yi, plan.nodule)
    exposure_gain, exposure_offset = rng.uniform(0.92, 1.06), rng.uniform(-0.03, 0.03)
    return np.clip(image * exposure_gain + exposure_offset, 0.0, 1.0)


def _image_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size) + 0.5) * 2 / size - 1
    return np.meshgrid(coords, coords)  # x varies along columns, y along rows


def _soft_ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float, *, edge: float
) -> np.ndarray:
    """An ellipse with a logistic rim: hard edges would be an unrealistically easy feature."""
    r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return 1 / (1 + np.exp(np.clip((r - 1) / edge, -50, 50)))


def _vessels(x: np.ndarray, y: np.ndarray, a: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Faint bright lines fanning out from each hilum, present in both classes.

    They give the lungs bright, label-independent structure, so "any brightness in the lung"
    is not enough to detect a nodule.
    """
    out = np.zeros_like(x)
    for side in (-1.0, 1.0):
        hx, hy = side * (a.lung_cx - 0.6 * a.lung_ax), a.lung_cy + 0.1
        for _ in range(6):
            spread = rng.uniform(-0.6, 0.6) * np.pi  # fan outwards, mirrored between sides
            angle = spread if side > 0 else np.pi - spread
            length = rng.uniform(0.2, 0.45)
            ex, ey = hx + length * np.cos(angle), hy + length * np.sin(angle)
            dist, along = _segment_distance(x, y, hx, hy, ex, ey)
            out += rng.uniform(0.04, 0.08) * (1 - 0.7 * along) * np.exp(-((dist / 0.012) ** 2))
    return out


def _segment_distance(
    x: np.ndarray, y: np.ndarray, x0: float, y0: float, x1: float, y1: float
) -> tuple[np.ndarray, np.ndarray]:
    """Distance to a segment and the position (0..1) of the nearest point along it."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(x - (x0 + t * dx), y - (y0 + t * dy)), t


def _low_frequency_texture(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A sum of a few random plane waves: smooth mottling that a flat phantom would lack."""
    out = np.zeros_like(x)
    for _ in range(8):
        fx, fy = rng.uniform(-3, 3, size=2)
        out += np.cos(np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))
    return 0.015 * out


def _nodule(x: np.ndarray, y: np.ndarray, nodule: Nodule) -> np.ndarray:
    radius = 2 * nodule.radius  # width fraction -> normalised units (image spans 2)
    r = np.hypot(x - nodule.x, y - nodule.y) / radius
    return nodule.contrast / (1 + np.exp(np.clip((r - 1) / 0.15, -50, 50)))


def _stored_values(display: np.ndarray, site: Site, pixel_seed: int) -> np.ndarray:
    """Applies the site's tone curve and detector noise, then quantises to its bit depth."""
    rng = np.random.default_rng([pixel_seed, 1])
    signal = display**site.gamma + rng.normal(0.0, site.noise_sd, display.shape)
    stored = np.rint(site.stored_low + signal * (site.stored_high - site.stored_low))
    return np.clip(stored, 0, site.max_stored).astype(np.uint16)


def _to_dataset(plan: ImagePlan, stored: np.ndarray, seed: int) -> Dataset:
    """Builds a DX For Presentation dataset, storing inverted values for MONOCHROME1."""
    site = plan.site
    sop_uid = _uid(seed, plan.patient_id, plan.image_number, "sop")
    monochrome1 = plan.polarity == "MONOCHROME1"
    pixels = (site.max_stored - stored).astype(np.uint16) if monochrome1 else stored

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = sop_uid
    date = plan.study_date.strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
    ds.AccessionNumber = f"ACC{plan.patient_number:06d}"
    ds.Modality = "DX"
    ds.Manufacturer = site.manufacturer
    ds.InstitutionName = site.institution
    ds.ReferringPhysicianName = "SYNTHETIC^REFERRER"
    ds.ManufacturerModelName = site.model
    ds.PatientName = f"SYNTHETIC^PATIENT{plan.patient_number:04d}"
    ds.PatientID = plan.patient_id
    ds.PatientBirthDate = plan.birth_date.strftime("%Y%m%d")
    ds.PatientSex = plan.sex
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.StudyInstanceUID = _uid(seed, plan.patient_id, "study")
    ds.SeriesInstanceUID = _uid(seed, plan.patient_id, plan.image_number, "series")
    ds.StudyID = f"{plan.patient_number:04d}"
    ds.SeriesNumber = plan.image_number
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    _set_image_pixel_tags(ds, plan, pixels)
    return ds


def _set_image_pixel_tags(ds: Dataset, plan: ImagePlan, pixels: np.ndarray) -> None:
    """Pixel description, grayscale pipeline tags and pixel data, in the plan's encoding.

    Presentation LUT Shape follows the DX IOD (INVERSE exactly when MONOCHROME1): it names the
    same single inversion, as in real DX files such as the corpus's 966_fixed.dcm.
    """
    site = plan.site
    monochrome1 = plan.polarity == "MONOCHROME1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = plan.polarity
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = ds.ImagerPixelSpacing = [site.pixel_spacing_mm, site.pixel_spacing_mm]
    ds.BitsAllocated = 16
    ds.BitsStored = site.bits_stored
    ds.HighBit = site.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if monochrome1 else -1
    center, width = site.window(plan.polarity)
    ds.WindowCenter, ds.WindowWidth = center, width
    ds.VOILUTFunction = "LINEAR"
    ds.RescaleIntercept = site.rescale_intercept
    ds.RescaleSlope = site.rescale_slope
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    ds.LossyImageCompression = "00"

    if plan.encoding in _UNCOMPRESSED:
        ds.file_meta.TransferSyntaxUID = plan.encoding
        ds.PixelData = pixels.astype("<u2").tobytes()
        ds["PixelData"].VR = "OW"
    else:
        ds.compress(plan.encoding, pixels, generate_instance_uid=False)


def _uid(seed: int, *parts: object) -> UID:
    """A UID hashed from the seed and the object's identity, so reruns reproduce it exactly."""
    return generate_uid(entropy_srcs=["medtransfer.synthetic", str(seed), *map(str, parts)])
