"""The data of the Topographic VAE experiments: MNIST and dSprites sequences.

Keller & Welling, "Topographic VAEs learn Equivariant Capsules", NeurIPS 2021
(arXiv 2109.01394): the transforming MNIST digits of Table 1 and Figures 1, 4,
6, 22 and 23, and the dSprites sequences of Table 2 and Figure 4, made the way
the authors' published code makes them. Read it top to bottom:

    MNIST files ──load_mnist──► digits ──mnist_sequences──► x (B, S, C, 28, 28)
                                           (rotate_scale, shift_hue, perspective)
    dSprites npz ──load_dsprites──► grid ──dsprites_sequences──► x (B, S, 1, 64, 64)
                   (render_dsprites)        (dsprites_epoch picks starts and factors)

MnistSequences and DspritesSequences hold one experiment's data on a device: its training
epochs, made batch by batch, and its fixed test sequences. write_png stores pictures of
them, and of what a model makes of them, as PNG files.

A sequence batch is (B, S, C, H, W); the model flattens it to N = B·S images
with the frame index fastest (image b·S + l), and so do the image operations here:
every random choice is made once per sequence, and all N frames are then
transformed by one batched call per operation.

render_dsprites() draws the dSprites sub-grid procedurally so that the dSprites
experiments and the tests run offline. It is not the real dataset: the three
shapes are exact implicit curves (a square, a 2:1 ellipse and the algebraic
heart (x² + y² − 1)³ = x²y³) tested at pixel centres, with sizes and the
position range chosen by eye to resemble dSprites, so pixel outlines, the
heart's silhouette and the exact placement differ from DeepMind's images.
The factor grid, its order and its cyclic structure are the same.

This module imports only torch and the standard library: copy it alone into
lecture material and it runs.
"""
import ast
import gzip
import hashlib
import http.client
import itertools
import math
import os
import pathlib
import struct
import urllib.request
import zipfile
import zlib

import torch
import torch.nn.functional as F

NET_TIMEOUT_S = 10        # seconds a download may stall before it is given up


class DataError(Exception):
    """A problem with the data files that the user can fix; str() is one line saying how."""


def default_data_dir():
    """The folder that holds the data files: $TVAE_DATA_DIR if set, else data/ beside this file."""
    return pathlib.Path(os.environ.get("TVAE_DATA_DIR") or pathlib.Path(__file__).resolve().parent / "data")


def _download(url, dest, md5=None):
    """Fetch url into the file dest, via a temporary name so that dest never holds a partial file.

    Raises OSError (also for an MD5 mismatch), http.client.HTTPException or
    ValueError; the caller turns them into a DataError.
    """
    part = dest.with_name(dest.name + ".part")
    print(f"downloading {url} -> {dest}", flush=True)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with urllib.request.urlopen(url, timeout=NET_TIMEOUT_S) as response, open(part, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if md5 is not None and digest.hexdigest() != md5:
            raise OSError(f"{url} has MD5 {digest.hexdigest()}, expected {md5}")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


DOWNLOAD_ERRORS = (OSError, http.client.HTTPException, ValueError)   # what a failed _download raises


def _damaged(path, problem):
    """The DataError for a data file that is there but unusable: name it, say what is wrong and the fix."""
    return DataError(f"{path} {problem}; delete it to download it again")


# ─── MNIST files ─────────────────────────────────────────────────────────────
# The standard IDX files, train 60,000 / test 10,000 digits of 28×28 uint8.
# An IDX file is a big-endian header (magic number, then one uint32 per
# dimension) followed by the raw bytes. Magic 2051 = 0x0803 means
# "unsigned bytes (0x08) in 3 dimensions", 2049 = 0x0801 the same in 1.

MNIST_MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]
# MD5 of the published files: checked on download only. Files already on disk
# are checked by their IDX structure instead, so a re-compressed copy (or a
# tiny test file) with a different MD5 but valid content loads.
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


def _read_idx(path, magic):
    """The uint8 array of a gzipped IDX file, checked against its own header (else DataError)."""
    try:
        with gzip.open(path, "rb") as f:
            data = bytearray(f.read())
    except (OSError, EOFError, zlib.error) as error:              # not gzip, truncated, corrupt
        raise _damaged(path, f"is not a readable gzip file ({error})") from None
    n_dims = magic & 0xFF
    header = 4 + 4 * n_dims
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise _damaged(path, f"is not an MNIST IDX file of this kind (magic number is not {magic})")
    dims = struct.unpack(f">{n_dims}I", data[4:header])
    if len(data) - header != math.prod(dims):
        raise _damaged(path, f"holds {len(data) - header} bytes after a header announcing {dims}: "
                             f"truncated or corrupt")
    return torch.frombuffer(data, dtype=torch.uint8, offset=header).view(dims)


def _fetch_mnist(name, data_dir):
    """Download one MNIST file into data_dir from the first mirror that serves it with the published MD5."""
    errors = []
    for mirror in MNIST_MIRRORS:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            _download(mirror + name, data_dir / name, MNIST_MD5[name])
            return
        except DOWNLOAD_ERRORS as error:
            errors.append(f"{mirror}: {error}")
    raise DataError(f"MNIST file {name} is missing from {data_dir} and could not be downloaded "
                    f"({'; '.join(errors)}); put {', '.join(MNIST_MD5)} in that folder, "
                    f"or point --data-dir (or TVAE_DATA_DIR) at a folder that holds them")


def load_mnist(data_dir=None, train=True):
    """MNIST digits and labels from the four standard IDX .gz files directly inside data_dir.

    Returns uint8 images (n, 28, 28) and int64 labels (n,): the 60,000 training
    digits, or with train=False the 10,000 test digits. data_dir defaults to
    default_data_dir(). Missing files are downloaded (short network timeout,
    published MD5 checked); when that fails, and when a file is truncated,
    corrupt or not an IDX file of the right kind, a DataError says which file
    or folder and what to do.
    """
    data_dir = pathlib.Path(data_dir or default_data_dir())
    prefix = "train" if train else "t10k"
    paths = data_dir / f"{prefix}-images-idx3-ubyte.gz", data_dir / f"{prefix}-labels-idx1-ubyte.gz"
    for path in paths:
        if not path.exists():
            _fetch_mnist(path.name, data_dir)
    images, labels = _read_idx(paths[0], 2051), _read_idx(paths[1], 2049)   # (n, 28, 28), (n,)
    if len(images) != len(labels):
        raise DataError(f"{paths[0]} holds {len(images)} images but {paths[1]} holds {len(labels)} labels; "
                        f"delete both to download them again")
    return images, labels.long()


def mnist_train_test(data_dir=None, seed=0):
    """The authors' split: train on 80% of the MNIST training set, evaluate on the test set.

    As in the reference, 20% of the 60,000 training digits (n // 5) are held
    out by a shuffle seeded with `seed` and the model trains on the other
    48,000; evaluation uses the 10,000 test digits. Returns
    {'train': (images, labels), 'test': (images, labels)} with uint8 images
    (n, 28, 28) and int64 labels (n,).
    """
    images, labels = load_mnist(data_dir, train=True)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    keep = order[len(images) // 5:]                                # the first fifth is held out
    return {"train": (images[keep], labels[keep]), "test": load_mnist(data_dir, train=False)}


# ─── Image operations ────────────────────────────────────────────────────────
# Every operation takes N images (N, C, H, W) and one parameter per image (N,),
# so a whole batch of sequences is transformed in one call. The geometric ones
# build a 3×3 matrix per image that maps SOURCE to DESTINATION pixel
# coordinates (x right, y down, pixel centres at the integers 0…W−1, as OpenCV
# and kornia number them), invert it, and let grid_sample read every
# destination pixel from its source point: bilinear, zero outside the image.

def _matrices(rows):
    """Stack nested lists of (N,) tensors into a batch of matrices (N, rows, cols)."""
    return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)


def _warp(images, src_to_dst):
    """Resample images (N, C, H, W) under homographies src_to_dst (N, 3, 3) in pixel coordinates."""
    n, _, h, w = images.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=images.dtype, device=images.device),
                            torch.arange(w, dtype=images.dtype, device=images.device), indexing="ij")
    dst = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).view(1, h * w, 3)   # homogeneous pixel centres
    src = dst @ torch.linalg.inv(src_to_dst).transpose(1, 2)                       # (N, H·W, 3)
    z = src[..., 2:]
    src = src[..., :2] / torch.where(z.abs() > 1e-8, z, 1.0)   # perspective divide, kornia's guard at z ≈ 0
    # align_corners=True: pixel centre 0 ↦ −1 and W−1 ↦ +1, the integer-centre convention above.
    grid = src * torch.tensor([2 / (w - 1), 2 / (h - 1)], dtype=src.dtype, device=src.device) - 1
    return F.grid_sample(images, grid.view(n, h, w, 2), mode="bilinear", padding_mode="zeros",
                         align_corners=True)


def rotate_scale(images, angles_deg, scales):
    """Rotate each image by its angle (degrees) and scale it about (W/2, H/2), as OpenCV does.

    The source→destination map is OpenCV's getRotationMatrix2D, which the
    authors use: [[a, b, (1−a)·cx − b·cy], [−b, a, b·cx + (1−a)·cy]] with
    a = s·cos θ, b = s·sin θ and (cx, cy) = (W/2, H/2), in pixel coordinates x
    right, y down. A positive angle therefore turns the digit anticlockwise as
    seen on the screen. With pixel centres at integers the centre (14, 14) of a
    28×28 image is half a pixel off its middle, as in the authors' code.
    images (N, C, H, W) float; angles_deg, scales (N,); returns (N, C, H, W).
    """
    _, _, h, w = images.shape
    theta = torch.deg2rad(angles_deg.to(images.dtype))
    scales = scales.to(images.dtype)
    a, b = scales * torch.cos(theta), scales * torch.sin(theta)    # (N,)
    cx, cy = w / 2, h / 2
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    src_to_dst = _matrices([[a, b, (1 - a) * cx - b * cy],
                            [-b, a, b * cx + (1 - a) * cy],
                            [zero, zero, one]])                    # (N, 3, 3)
    return _warp(images, src_to_dst)


def shift_hue(images, hues):
    """Add hues (radians) to the HSV hue of RGB images in [0, 1], keeping saturation and value.

    RGB → HSV (hue in [0, 2π)), hue + shift modulo 2π, → RGB. Both
    conversions are written in units of a sixth of a turn (60°), where the
    standard formulas are simplest. images (N, 3, H, W); hues (N,); returns (N, 3, H, W).
    """
    r, g, b = images.unbind(dim=1)                                 # (N, H, W) each
    value = images.amax(dim=1)                                     # V, the largest channel
    chroma = value - images.amin(dim=1)                            # V·S
    safe = chroma.clamp(min=1e-12)                                 # grey pixels: numerators are 0 too, hue 0
    sector = torch.where(r == value, (g - b) / safe,               # hue in sixths, by the largest channel
                         torch.where(g == value, 2 + (b - r) / safe, 4 + (r - g) / safe))
    sector = sector + hues.to(images.dtype).view(-1, 1, 1) / (math.pi / 3)         # shifted
    # HSV → RGB: channel n ∈ (R, G, B) = (5, 3, 1) is V − V·S·clamp(min(k, 4 − k), 0, 1)
    # with k = (n + hue in sixths) mod 6; the mod is the "modulo 2π" of the shift.
    n = torch.tensor([5.0, 3.0, 1.0], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    k = (n + sector[:, None]) % 6                                  # (N, 3, H, W)
    return value[:, None] - chroma[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def perspective(images, angles_deg):
    """Tilt each image in 3-D by its angle (degrees) and project it back, as the reference does.

    The authors' 3-D view: rotations phi = gamma = angle about the y and z
    axes (theta = 0, so Rx = I), focal length f = D / (2 sin gamma) with
    D = √(H² + W²) (f = D where sin gamma = 0, negative past 180°), and the
    source→destination homography A2 · T(dz = f) · Ry · Rz · A1. An angle of exactly 0 leaves the
    image untouched and 180 is replaced by 181 (the degenerate edge-on view),
    both as in the reference. images (N, C, H, W); angles_deg (N,); returns (N, C, H, W).
    """
    _, _, h, w = images.shape
    angles = angles_deg.to(images.dtype)
    angles = torch.where(angles == 180, 181.0, angles)
    rad = torch.deg2rad(angles)
    c, s = torch.cos(rad), torch.sin(rad)                          # (N,)
    diag = math.hypot(h, w)
    f = torch.where(s == 0, diag, diag / (2 * s))                  # (N,)
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    a1 = _matrices([[one, zero, -w / 2 * one],                     # 2-D pixel → 3-D point, centred
                    [zero, one, -h / 2 * one],
                    [zero, zero, one],
                    [zero, zero, one]])                            # (N, 4, 3)
    ry = _matrices([[c, zero, -s, zero],                           # phi about y
                    [zero, one, zero, zero],
                    [s, zero, c, zero],
                    [zero, zero, zero, one]])
    rz = _matrices([[c, -s, zero, zero],                           # gamma about z
                    [s, c, zero, zero],
                    [zero, zero, one, zero],
                    [zero, zero, zero, one]])
    t = _matrices([[one, zero, zero, zero],                        # translation dz = f
                   [zero, one, zero, zero],
                   [zero, zero, one, f],
                   [zero, zero, zero, one]])
    a2 = _matrices([[f, zero, w / 2 * one, zero],                  # 3-D point → 2-D pixel, focal length f
                    [zero, f, h / 2 * one, zero],
                    [zero, zero, one, zero]])                      # (N, 3, 4)
    warped = _warp(images, a2 @ t @ ry @ rz @ a1)                  # homography (N, 3, 3)
    return torch.where((angles == 0).view(-1, 1, 1, 1), images, warped)


# ─── MNIST sequences (Table 1; Figures 1, 4, 6, 22, 23) ─────────────────────
# Three cyclic sets of 18 values. A sequence walks one (or two) of them from a
# random start, one step per frame; the others stay at one random value each.

N_FRAMES_MNIST = 18
MNIST_ANGLES = torch.arange(18) * 20.0                               # 0, 20, …, 340 degrees
MNIST_HUES = torch.deg2rad(torch.arange(18) * 20.0) - math.pi       # radians(0, 20, …, 340) − π
MNIST_SCALES = torch.tensor([0.60, 0.64, 0.68, 0.72, 0.76, 0.79, 0.83, 0.87, 0.91,
                             0.95, 0.99, 1.03, 1.07, 1.11, 1.14, 1.18, 1.22, 1.26])
SEQUENCE_KINDS = ("single", "dual", "perspective", "none")


def mnist_sequences(digits, kind, colour, generator=None):
    """Turn B digits into B transformation sequences of S = 18 frames (S = 1 for kind 'none').

    kind 'single': each sequence walks ONE of rotation, scale, hue (label
    'transform' 0, 1, 2, uniform) through its set in cyclic order from a random
    start; the other two are held at one random value each. 'dual': rotation
    and hue advance together from independent random starts, scale 1.0.
    'perspective': like dual with the perspective warp in place of the
    rotation. 'none': the plain digit. With colour the digit goes into the red
    channel (G = B = 0) and is hue-shifted (C = 3); without, C = 1, there is no
    hue (labels −1) and 'single' picks only rotation or scale. digits (B, H, W)
    uint8 or float in [0, 1], on any device. Returns x (B, S, C, H, W) float32
    on that device and labels {'transform' (B,), 'angle', 'scale', 'hue'
    (B, S) set indices, −1 where a factor is not in play}, on that device too.
    Every random choice comes from `generator` (a CPU torch.Generator, or the
    global RNG) on the CPU, so a seed gives the same sequences on any device.
    """
    if kind not in SEQUENCE_KINDS:
        raise ValueError(f"kind must be one of {SEQUENCE_KINDS}, not {kind!r}")
    device = digits.device
    x = digits.float() / 255 if digits.dtype == torch.uint8 else digits.float()   # (B, H, W)
    B, H, W = x.shape
    if kind == "none":
        x = x[:, None, None]                                       # (B, 1, 1, H, W)
        labels = {name: torch.full((B, 1), -1, device=device) for name in ("angle", "scale", "hue")}
        labels["transform"] = torch.full((B,), -1, device=device)
        return (F.pad(x, (0, 0, 0, 0, 0, 2)) if colour else x), labels   # red channel: pad G and B with 0

    S, n_values = N_FRAMES_MNIST, len(MNIST_ANGLES)                # 18 frames; 18 values in each set
    start = torch.randint(n_values, (B, 3), generator=generator)   # a random index per set: angle, scale, hue
    if kind == "single":
        transform = torch.randint(3 if colour else 2, (B,), generator=generator)
        walking = F.one_hot(transform, 3)                          # (B, 3): 1 for the set that advances
    else:
        transform = torch.full((B,), -1)
        walking = torch.tensor([1, 0, 1]).expand(B, 3)             # rotation and hue together
    steps = torch.arange(S)
    index = (start[:, None, :] + steps[None, :, None] * walking[:, None, :]) % n_values   # (B, S, 3)
    angle_idx, scale_idx, hue_idx = index.unbind(dim=-1)           # (B, S) each
    angles = MNIST_ANGLES[angle_idx].flatten().to(device)          # (N,) with N = B·S
    scales = (MNIST_SCALES[scale_idx] if kind == "single" else torch.ones(B, S)).flatten().to(device)
    hues = MNIST_HUES[hue_idx].flatten().to(device)
    if kind != "single":
        scale_idx = torch.full_like(scale_idx, -1)                 # scale 1.0 is not in the set
    if not colour:
        hue_idx = torch.full_like(hue_idx, -1)

    # One batched call per operation on all N frames, frame index fastest (image b·S + l).
    frames = x[:, None, None].expand(B, S, 1, H, W).reshape(B * S, 1, H, W)          # (N, 1, H, W)
    if kind == "perspective":
        frames = perspective(frames, angles)
    else:
        frames = rotate_scale(frames, angles, scales)
    if colour:
        # The digit goes into the red channel (G = B = 0), then its hue is shifted.
        # A red pixel (v, 0, 0) has hue 0, saturation 1 and value v, so its shifted
        # colour is v times the shifted colour of pure red: one RGB factor per frame.
        red = torch.tensor([1.0, 0.0, 0.0], device=device).expand(B * S, 3)[..., None, None]
        frames = frames * shift_hue(red, hues)                     # (N, 1, H, W) · (N, 3, 1, 1) → (N, 3, H, W)
    labels = {"transform": transform, "angle": angle_idx, "scale": scale_idx, "hue": hue_idx}
    return frames.view(B, S, -1, H, W), {name: value.to(device) for name, value in labels.items()}


# ─── dSprites (Table 2, Figure 4) ────────────────────────────────────────────
# The published file holds 737,280 binary 64×64 images over the full factor
# grid (shape 3, scale 6, orientation 40, posX 32, posY 32), row-major in that
# order. Every experiment uses one sub-grid: all shapes, scale indices 1–5,
# orientation/posX/posY indices 0, 2, …, 28. Its axes are numbered
# 0 shape, 1 scale, 2 orientation, 3 posX, 4 posY throughout.

DSPRITES_FILE = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
DSPRITES_URL = "https://github.com/deepmind/dsprites-dataset/raw/master/" + DSPRITES_FILE
DSPRITES_FULL_GRID = (3, 6, 40, 32, 32)
DSPRITES_GRID = (3, 5, 15, 15, 15)
N_FRAMES_DSPRITES = 15


def _read_npy_header(f, path):
    """The header dict of a .npy stream, parsed as a Python literal (never unpickled)."""
    magic = f.read(8)                                              # b"\x93NUMPY", major, minor version
    if len(magic) < 8 or magic[:6] != b"\x93NUMPY":
        raise _damaged(path, "holds an imgs.npy that is not a .npy array")
    length = int.from_bytes(f.read(2 if magic[6] == 1 else 4), "little")   # version 1: uint16; 2, 3: uint32
    try:
        header = ast.literal_eval(f.read(length).decode("latin1"))
    except (ValueError, SyntaxError):
        header = None
    if not isinstance(header, dict):
        raise _damaged(path, "holds an imgs.npy with an unreadable header")
    return header


def _read_dsprites_subgrid(f, path):
    """Stream imgs.npy (737280, h, w) uint8 and keep the sub-grid: (3, 5, 15, 15, 15, h, w).

    The full array is 3 GB at 64×64, so it is read one (shape, scale,
    orientation) block of 32×32 positions at a time and only the wanted blocks
    and positions are copied out: peak memory is the 200 MB result.
    """
    header = _read_npy_header(f, path)
    shape = header.get("shape")
    if (header.get("descr") not in ("|u1", "u1") or header.get("fortran_order") is not False
            or not isinstance(shape, tuple) or len(shape) != 3 or shape[0] != math.prod(DSPRITES_FULL_GRID)):
        raise _damaged(path, f"holds imgs.npy {header}, not uint8 images (737280, 64, 64) in C order")
    h, w = shape[1:]
    out = torch.empty(*DSPRITES_GRID, h, w, dtype=torch.uint8)
    n_x, n_y = DSPRITES_FULL_GRID[3:]
    buffer = bytearray(n_x * n_y * h * w)
    block = torch.frombuffer(buffer, dtype=torch.uint8).view(n_x, n_y, h, w)   # shares memory with buffer
    for shape_i, scale_i, orient_i in itertools.product(*map(range, DSPRITES_FULL_GRID[:3])):   # row-major
        if f.readinto(buffer) != len(buffer):                      # refills `block` in place
            raise _damaged(path, "holds an imgs.npy shorter than its header says")
        if scale_i >= 1 and orient_i < 30 and orient_i % 2 == 0:   # the sub-grid's scales and orientations
            out[shape_i, scale_i - 1, orient_i // 2] = block[0:30:2, 0:30:2]   # its positions, (15, 15, h, w)
    if f.read(1):                                                  # reading to the end also checks the CRC
        raise _damaged(path, "holds an imgs.npy longer than its header says")
    return out


def load_dsprites(path=None):
    """The experiments' sub-grid of the published dSprites file: uint8 (3, 5, 15, 15, 15, 64, 64), 0/1.

    All 3 shapes, scale indices 1–5, orientation, posX and posY indices 0, 2, …, 28.

    path is the .npz file, or (any path not ending in .npz) the folder that
    holds it under its published name DSPRITES_FILE; it defaults to
    default_data_dir(). A missing file is
    downloaded from DSPRITES_URL (short network timeout, temporary name then
    rename). Only the imgs.npy entry is read, streamed in blocks, its .npy
    header parsed as a literal: the pickled metadata entry is never touched.
    The image size is taken from that header, so a small test file with the
    real layout loads too. Offline, or a corrupt or wrongly shaped file: a
    DataError naming the file.
    """
    path = pathlib.Path(path or default_data_dir())
    if path.suffix != ".npz":
        path = path / DSPRITES_FILE
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _download(DSPRITES_URL, path)
        except DOWNLOAD_ERRORS as error:
            raise DataError(f"dSprites file {path} is missing and could not be downloaded from "
                            f"{DSPRITES_URL} ({error}); put {DSPRITES_FILE} there, or point --data-dir "
                            f"(or TVAE_DATA_DIR) at a folder that holds it, or draw the sprites "
                            f"with --dsprites procedural") from None
    try:
        with zipfile.ZipFile(path) as archive, archive.open("imgs.npy") as f:
            return _read_dsprites_subgrid(f, path)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, zlib.error) as error:
        raise _damaged(path, f"is not a readable dSprites .npz ({error})") from None


def render_dsprites():
    """Draw the dSprites sub-grid procedurally: uint8 (3, 5, 15, 15, 15, 64, 64), 0/1.

    Same factors as the real sub-grid: square, ellipse, heart; scales
    linspace(0.5, 1, 6)[1:]; orientations linspace(0, 2π, 40) and positions
    linspace(0, 1, 32) at indices 0, 2, …, 28. Every pixel centre is mapped
    into the sprite's own frame (undo the position, the rotation and the
    scale) and tested against the shape's implicit equation, for all 15³
    poses of one (shape, scale) at once. Only a 32×32 window around each
    sprite is tested (the largest sprite spans under 28 pixels), a quarter of
    the work of the whole frame. See the module docstring for how it differs
    from the published images.
    """
    size, window = 64, 32
    half_size = 9.0                                     # pixels from centre to side, square of scale 1
    scales = torch.linspace(0.5, 1, 6)[1:]                         # (5,)
    angles = torch.linspace(0, 2 * math.pi, 40)[0:30:2]            # (15,)
    centres = 10 + 43 * torch.linspace(0, 1, 32)[0:30:2]           # (15,) pixel centres 10 … 49, by eye
    first = (centres.round().long() - window // 2).clamp(0, size - window)
    pixels = first[:, None] + torch.arange(window)                 # (15 positions, 32): the window's pixels
    offsets = pixels - centres[:, None]                            # (15, 32) pixel centre − sprite centre
    dx = offsets.view(1, 15, 1, 1, window)                         # (orientation, posX, posY, H, W)
    dy = offsets.view(1, 1, 15, window, 1)
    cos, sin = angles.cos().view(15, 1, 1, 1, 1), angles.sin().view(15, 1, 1, 1, 1)
    along = cos * dx + sin * dy                                    # (15, 15, 15, 32, 32), rotated back
    across = cos * dy - sin * dx
    sprites = torch.empty(*DSPRITES_GRID, window, window, dtype=torch.uint8)
    for scale_i, scale in enumerate(scales.tolist()):
        u, v = along / (half_size * scale), across / (half_size * scale)   # the sprite's frame, |u|, |v| ≤ ~1
        sprites[0, scale_i] = torch.maximum(u.abs(), v.abs()) <= 1            # square
        sprites[1, scale_i] = u ** 2 + (2 * v) ** 2 <= 1                       # ellipse, axes 1 and 1/2
        hx, hy = 1.15 * u, 0.12 - 1.15 * v                                    # heart: y up, centred, ~[−1, 1]
        sprites[2, scale_i] = (hx ** 2 + hy ** 2 - 1) ** 3 - hx ** 2 * hy ** 3 <= 0
    # Paste every window into its 64×64 frame: pixel (a, b) of pose (orientation, x, y)
    # goes to row pixels[y, a], column pixels[x, b].
    out = torch.zeros(*DSPRITES_GRID, size, size, dtype=torch.uint8)
    pose = torch.arange(15)
    out[:, :, pose.view(15, 1, 1, 1, 1), pose.view(1, 15, 1, 1, 1), pose.view(1, 1, 15, 1, 1),
        pixels.view(1, 1, 15, window, 1), pixels.view(1, 15, 1, 1, window)] = sprites
    return out


def dsprites_epoch(n_start_points, batch_size, generator=None):
    """One epoch of sequence start points: an iterator of (starts (B, 5) long, factors (B,) long).

    Every sub-grid point is a start exactly once, in an order shuffled by
    `generator` (CPU, or the global RNG when None), in batches of batch_size,
    the last partial batch dropped. Each start gets a factor to transform drawn
    uniformly from 1 scale, 2 orientation, 3 posX, 4 posY. n_start_points keeps
    only the first n shuffled points (None: all 50,625). All random draws are
    made when this is called, not while iterating.
    """
    order = torch.randperm(math.prod(DSPRITES_GRID), generator=generator)[:n_start_points]
    factors = torch.randint(1, 5, (len(order),), generator=generator)
    starts = torch.stack(torch.unravel_index(order, DSPRITES_GRID), dim=1)   # (n, 5) grid indices
    keep = len(order) // batch_size * batch_size
    return zip(starts[:keep].split(batch_size), factors[:keep].split(batch_size))


def dsprites_sequences(grid, starts, factors, n_transforms=N_FRAMES_DSPRITES):
    """Sequences on the sub-grid: the chosen factor advances +1 per frame, wrapping around.

    Frame t of sequence b is the grid image at starts[b] with factor
    factors[b] moved to (start + t) mod its sub-grid size (5 for scale, 15
    otherwise), for S = n_transforms frames. grid uint8 (3, 5, 15, 15, 15, H, W)
    on any device; starts (B, 5) long; factors (B,) long. Returns x
    (B, S, 1, H, W) float32 and labels (B, S, 5) long (the factor indices of
    every frame), both on grid's device.
    """
    starts, factors = starts.to(grid.device), factors.to(grid.device)
    sizes = torch.tensor(grid.shape[:5], device=grid.device)      # (5,)
    steps = torch.arange(n_transforms, device=grid.device)
    moving = F.one_hot(factors, 5)                                 # (B, 5)
    labels = (starts[:, None, :] + steps[None, :, None] * moving[:, None, :]) % sizes   # (B, S, 5)
    x = grid[labels.unbind(dim=-1)]                                # (B, S, H, W)
    return x[:, :, None].float(), labels


# ─── An experiment's epochs and test sequences ───────────────────────────────
# The same calls for MNIST and dSprites. epoch() shuffles the training set and
# then makes the sequences batch by batch on the device of the data; n_batches()
# and test_size() say how many there will be. Every random choice comes from one
# CPU generator, so a seed gives the same epochs and test set on any device.
# kinds(labels) names the transformation each sequence walks.

KINDS = ("rotation", "scale", "hue", "rotation+hue", "perspective+hue", "orientation", "posX", "posY")
DSPRITES_FACTORS = {1: "scale", 2: "orientation", 3: "posX", 4: "posY"}   # the grid axes that move

def _whole_batches(order, batch_size):
    """(n,) → (n // batch_size, batch_size): the last partial batch is dropped."""
    if len(order) < batch_size:
        raise DataError(f"fewer sequences ({len(order)}) than one batch ({batch_size})")
    return order[:len(order) // batch_size * batch_size].view(-1, batch_size)


class MnistSequences:
    """The MNIST digits of the authors' split on a device, and the sequences of one experiment."""

    def __init__(self, data_dir, seed, test_seed, train_kind, test_kind, colour, device="cpu"):
        split = mnist_train_test(data_dir, seed=seed)              # the held-out fifth: seed's
        self.train_digits = split["train"][0].to(device)
        self.test_digits, self.test_classes = (part.to(device) for part in split["test"])
        self.test_seed, self.train_kind, self.test_kind = test_seed, train_kind, test_kind
        self.colour = colour

    def epoch(self, batch_size, n_sequences, generator):
        """Each training digit once (the first n_sequences of a shuffled order, None: all) as a
        sequence, in batches x (B, S, C, H, W); the order is drawn first, then each batch."""
        order = torch.randperm(len(self.train_digits), generator=generator)[:n_sequences]
        for rows in _whole_batches(order, batch_size):
            digits = self.train_digits[rows.to(self.train_digits.device)]
            yield mnist_sequences(digits, self.train_kind, self.colour, generator)[0]

    def n_batches(self, batch_size, n_sequences):
        """How many batches epoch() yields."""
        return min(len(self.train_digits), n_sequences or len(self.train_digits)) // batch_size

    def test_size(self, batch_size, n_sequences=None):
        """How many sequences test_batches() yields: the first n_sequences test digits (or all)."""
        return min(len(self.test_digits), n_sequences or len(self.test_digits))

    def test_batches(self, batch_size, n_sequences=None):
        """(x, labels, digit classes) of the first n_sequences test digits: the same for every call."""
        generator = torch.Generator().manual_seed(self.test_seed)
        n = self.test_size(batch_size, n_sequences)
        for start in range(0, n, batch_size):
            digits = self.test_digits[start:min(start + batch_size, n)]
            x, labels = mnist_sequences(digits, self.test_kind, self.colour, generator)
            yield x, labels, self.test_classes[start:start + len(digits)]

    def kinds(self, labels):
        """Per sequence of a test batch: rotation, scale or hue ('single'), or the two that walk together."""
        if self.test_kind == "single":
            return [KINDS[k] for k in labels["transform"].tolist()]         # 0 rotation, 1 scale, 2 hue
        return [f"{'rotation' if self.test_kind == 'dual' else 'perspective'}+hue"] * len(labels["transform"])


class DspritesSequences:
    """The dSprites sub-grid (3, 5, 15, 15, 15, 64, 64) on a device, and its sequences of S frames."""

    TEST_SEQUENCES = 1024   # dSprites has no test split: a fixed set of sequences for evaluation

    def __init__(self, grid, test_seed, n_transforms=N_FRAMES_DSPRITES):
        self.grid, self.test_seed, self.n_transforms = grid, test_seed, n_transforms

    def epoch(self, batch_size, n_sequences, generator):
        """Every grid point once as a start (the first n_sequences of a shuffled order), with a
        random factor, in batches x (B, S, 1, 64, 64); dsprites_epoch draws all of it first."""
        batches = dsprites_epoch(n_sequences, batch_size, generator)
        if self.n_batches(batch_size, n_sequences) == 0:
            raise DataError(f"fewer sequences ({n_sequences}) than one batch ({batch_size})")
        for starts, factors in batches:
            yield dsprites_sequences(self.grid, starts, factors, self.n_transforms)[0]

    def n_batches(self, batch_size, n_sequences):
        """How many batches epoch() yields."""
        n = math.prod(DSPRITES_GRID)
        return min(n, n_sequences or n) // batch_size

    def test_size(self, batch_size, n_sequences=None):
        """How many sequences test_batches() yields: n_sequences (or TEST_SEQUENCES) in whole
        batches."""
        n = n_sequences or self.TEST_SEQUENCES
        return n // min(batch_size, n) * min(batch_size, n)

    def test_batches(self, batch_size, n_sequences=None):
        """(x, labels, None) of a fixed set of sequences (TEST_SEQUENCES, in whole batches)."""
        n = n_sequences or self.TEST_SEQUENCES
        generator = torch.Generator().manual_seed(self.test_seed)
        for starts, factors in dsprites_epoch(n, min(batch_size, n), generator):
            yield *dsprites_sequences(self.grid, starts, factors, self.n_transforms), None

    def kinds(self, labels):
        """Per sequence of a batch (labels (B, S, 5)): the factor that moves from frame 0 to frame 1."""
        return [DSPRITES_FACTORS[f] for f in (labels[:, 1] != labels[:, 0]).int().argmax(dim=1).tolist()]


# ─── Pictures: PNG files written with zlib alone ─────────────────────────────
# The other direction of the image files above: tensors of images laid out on one canvas and
# written as a PNG, so that pictures need nothing beyond torch and the standard library.

def write_png(path, image, scale=1):
    """Write image (C, H, W), C = 1 (grey) or 3 (RGB), values in [0, 1], as an 8-bit PNG, scale× enlarged."""
    pixels = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    pixels = pixels.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)      # nearest neighbour
    channels, height, width = pixels.shape
    rows = pixels.permute(1, 2, 0).reshape(height, width * channels)
    scanlines = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), rows], dim=1)  # filter type 0 per row
    raw = bytearray(scanlines.numel())                      # the bytes, copied through a tensor view
    torch.frombuffer(raw, dtype=torch.uint8).copy_(scanlines.flatten())

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, {1: 0, 3: 2}[channels], 0, 0, 0])
    pathlib.Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                           + chunk(b"IDAT", zlib.compress(raw, 6))
                           + chunk(b"IEND", b""))


def image_grid(rows, pad=2, background=0.5):
    """Lay out rows of images [(n_i, C, H, W), …] on one canvas (C', H', W'), grey between cells."""
    channels, (height, width) = max(row.shape[1] for row in rows), rows[0].shape[2:]
    n_cols = max(len(row) for row in rows)
    canvas = torch.full((channels, pad + len(rows) * (height + pad), pad + n_cols * (width + pad)), background)
    for r, row in enumerate(rows):
        for c, image in enumerate(row.detach().cpu().float()):
            top, left = pad + r * (height + pad), pad + c * (width + pad)
            canvas[:, top:top + height, left:left + width] = image.expand(channels, -1, -1)
    return canvas


# Ten colours for the digit classes (Figure 3); no grey (between cells), no black (no class).
CLASS_COLOURS = torch.tensor([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40],
                              [148, 103, 189], [140, 86, 75], [227, 119, 194], [255, 255, 255],
                              [188, 189, 34], [23, 190, 207]]) / 255


def selectivity_rows(labels, map_shape, class_means):
    """Figure 3's class-selectivity map as rows of images: a square per unit in its class's colour
    (labels (d,), −1 black); below, each class's mean test digit (10, C, H, W) in its colour."""
    colours = torch.cat([CLASS_COLOURS, torch.zeros(1, 3)])[labels.cpu()]   # −1 → black, (d, 3)
    cells = colours[:, :, None, None].expand(-1, -1, *class_means.shape[2:])  # (d, 3, H, W)
    means = class_means.cpu().mean(1, keepdim=True)                          # grey, (10, 1, H, W)
    legend = (means / means.amax(dim=(2, 3), keepdim=True).clamp(min=1e-8)
              * CLASS_COLOURS[:, :, None, None])
    return [*cells.split(map_shape[1]), legend]
